"""The one forward-with-prompt: `[prompt; input]` through the unmodified Hugging Face model.

Logits are computed only where a loss or a score needs them, by the model's own CausalLM forward
(so its head's scaling and soft-capping apply): a pre-hook on its output embedding hands the head
only the selected hidden states. The prompt's keys/values are computed once (per training step, per
`score` call, per prompt in a bank) and the rows run on top of them.

Positions, for every row: its prompt takes positions `0 .. p-1` and its input starts at `p`, where
`p` is that row's own prompt length (rows of a mixed batch have prompts of different lengths, left-padded
to the longest and masked). Position ids are always passed explicitly.

All code that touches the transformers cache API sits in the "cache" section below: when that API
changes, it is the one place to edit.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache, PreTrainedModel


@dataclass
class Continuation:
    """Rows that continue rows of a first input: one encoding of a shared context, several continuations.

    Continuation row `r` carries on from the first `contexts[r]` tokens of first-input row
    `parents[r]` (and its prompt), so an example's context is encoded once for all its multi-token
    choices; the parent row's later tokens (another choice, padding) are masked out. The rows run in
    `groups` (`(start, end, width)`: rows `[start, end)`, padded only to their longest row's `width`
    tokens), so that rows of very different lengths do not pad each other.
    """

    input_ids: Tensor  # [R, K] right-padded
    attention_mask: Tensor  # [R, K]
    parents: Tensor  # [R] row of the first input each row continues
    contexts: Tensor  # [R] tokens of the parent row it continues (the rest is hidden from it)
    rows: Tensor  # [M] continuation row of each scored position
    positions: Tensor  # [M] position in input_ids
    groups: list[tuple[int, int, int]]  # (start, end, width), known on the host: no device sync per group

    def to(self, device: torch.device) -> Continuation:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)})


# ---- the cache: every transformers call that hands a cache over or reads one back -----------------------


def _forward(
    model: PreTrainedModel,
    embeds: Tensor,
    mask: Tensor | None,
    position_ids: Tensor | None,
    cache: Cache | None,
    select: Callable[[Tensor], Tensor],
    use_cache: bool,
) -> tuple[Tensor, Cache | None]:
    """The one call into the HF model: its CausalLM forward, the LM head run on `select(hidden)` only.

    `select` maps the last hidden states `[B, T, H]` to the `[N, H]` rows whose logits are wanted;
    the model's own head and whatever follows it (Gemma's soft-capping, Granite's and Cohere's logit
    scaling) then run on those rows alone.

    Returns:
        logits `[N, V]` in the model's dtype, and the cache (None without `use_cache`).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head); softprompt needs a causal LM")
    fired = []

    def pick(module, args):  # [B, T, H] -> [N, H]
        fired.append(args[0].shape)
        return (select(args[0]), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=use_cache)
    finally:
        handle.remove()
    if len(fired) != 1:
        raise RuntimeError(
            f"{type(model).__name__}'s forward called its output embeddings {len(fired)} times (expected once); "
            "softprompt cannot select the scored positions for this architecture"
        )
    return out.logits, out.cache if use_cache else None


def _check_cache(cache: Cache | None, expected: int, model: PreTrainedModel) -> None:
    """Raise if the cache the model gave back does not hold `expected` positions (prompt + input)."""
    got = None if cache is None else cache.get_seq_length()
    if got != expected:
        import transformers

        raise RuntimeError(
            f"{type(model).__name__} returned a cache of {got} positions, expected {expected} (prompt + input): the "
            f"prompt's keys/values were not used. transformers {transformers.__version__} may have renamed its cache "
            "keyword; install a version in softprompt's tested range (pyproject.toml) or update core/forward.py"
        )


def _cache_rows(cache: Cache, index: Tensor | None) -> Cache:
    """A cache of rows `index` (None: all) of `cache`, which stays as it is (its layers are shallow-copied first)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    if index is not None:
        selected.batch_select_indices(index)
    return selected


def _cache_batch_size(cache: Cache) -> int:
    return cache.layers[0].keys.shape[0]


def _cache_with(template: Cache, states: list[tuple[Tensor, Tensor]], length: int) -> Cache:
    """A new cache like `template` (same layer kinds) holding `states` `(keys, values)` per layer, `length` positions."""
    cache = copy.copy(template)
    cache.layers = []
    for layer, (keys, values) in zip(template.layers, states):
        layer = copy.copy(layer)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count positions apart from their keys
            layer.cumulative_length = length
        cache.layers.append(layer)
    return cache


def _layer_states(cache: Cache) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # [B, heads, P, d] each


def sliding_window(model: PreTrainedModel) -> int | None:
    """The model's attention window in tokens if some of its layers use one (Gemma 3, Mistral), else None."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


# ---- prompts' keys/values --------------------------------------------------------------------------------


def _nothing(hidden: Tensor) -> Tensor:
    return hidden[:0, 0]  # [0, H]: no logits wanted


def prompt_keys_values(model: PreTrainedModel, prompt: Tensor) -> Cache:
    """The cache of a prompt run alone: `[P, H]` at batch 1 (or `[B, P, H]`), what `logits_at` puts before the rows.

    Scoring computes it once per prompt and hands it to every `logits_at` call; training lets
    `logits_at` compute it, since the prompt changes every step.
    """
    prompts = prompt.unsqueeze(0) if prompt.dim() == 2 else prompt  # [1 or B, P, H]
    embedding = model.get_input_embeddings().weight
    prompts = prompts.to(device=embedding.device, dtype=embedding.dtype)
    positions = torch.arange(prompts.shape[1], device=prompts.device).expand(prompts.shape[0], -1)  # [1 or B, P]
    _, cache = _forward(model, prompts, None, positions, None, _nothing, use_cache=True)
    _check_cache(cache, prompts.shape[1], model)
    return cache


def mixed_prompt_cache(caches: Sequence[Cache | None], row_prompt: Sequence[int]) -> tuple[Cache | None, Tensor]:
    """One batch cache for rows that each have their own prompt: row `i` gets `caches[row_prompt[i]]`.

    `caches` is a bank of `prompt_keys_values` results, each at batch 1 (None: no prompt, length 0).
    Prompts are left-padded to the longest one used here, so every row's prompt ends right before its
    input; `logits_at(..., prompt_cache=cache, prompt_mask=mask)` then starts each row's input at
    position = its own prompt's length.

    Returns:
        the cache `[B, heads, P_max, d]` per layer (None if no row has a prompt) and its mask `[B, P_max]`
        (1 on a row's own prompt positions, on the right).

    Raises:
        ValueError: an index outside the bank, or a prompt that does not fit a sliding-window layer.
    """
    for k in set(row_prompt):
        if not 0 <= k < len(caches):
            raise ValueError(f"row_prompt holds {k}, but the bank has {len(caches)} prompts (0..{len(caches) - 1})")
    used = sorted(set(row_prompt))
    lengths = {k: 0 if caches[k] is None else caches[k].get_seq_length() for k in used}
    longest = max(lengths.values(), default=0)
    template = next((caches[k] for k in used if caches[k] is not None), None)
    if template is None:
        return None, torch.zeros(len(row_prompt), 0, dtype=torch.long)
    where = {k: i for i, k in enumerate(used)}
    index = torch.tensor([where[k] for k in row_prompt], device=template.layers[0].keys.device)
    states = []
    for layer, (keys, values) in enumerate(_layer_states(template)):
        padded_keys, padded_values = [], []
        for k in used:
            if caches[k] is None:
                k_states = v_states = keys.new_zeros(1, keys.shape[1], 0, keys.shape[3])
            else:
                k_states, v_states = _layer_states(caches[k])[layer]
            if k_states.shape[-2] != lengths[k]:
                raise ValueError(
                    f"prompt {k} has {lengths[k]} positions but layer {layer} keeps {k_states.shape[-2]} (a sliding "
                    "window): it cannot share a batch with other prompts; score it alone"
                )
            pad = (0, 0, longest - lengths[k], 0)  # left, along the positions
            padded_keys.append(torch.nn.functional.pad(k_states, pad))
            padded_values.append(torch.nn.functional.pad(v_states, pad))
        states.append((torch.cat(padded_keys)[index], torch.cat(padded_values)[index]))  # [B, heads, P_max, d]
    bank_mask = torch.tensor([[0] * (longest - lengths[k]) + [1] * lengths[k] for k in used], device=index.device)
    return _cache_with(template, states, longest), bank_mask[index]


def _prompt_part(
    model: PreTrainedModel, prompt: Tensor | None, prompt_cache: Cache | None, prompt_mask: Tensor | None, batch: int, device
) -> tuple[Cache | None, Tensor]:
    """The cache (a new one: the caller's stays as it is) and mask `[B, P]` of the rows' prompts."""
    if prompt_cache is None and prompt is not None:
        prompt_cache = prompt_keys_values(model, prompt)
    if prompt_cache is None:
        return None, torch.zeros(batch, 0, dtype=torch.long, device=device)
    rows = _cache_batch_size(prompt_cache)
    if rows not in (1, batch):
        raise ValueError(f"prompt cache has {rows} rows for a batch of {batch}; give one prompt per row or one for all")
    cache = _cache_rows(prompt_cache, torch.zeros(batch, dtype=torch.long, device=device) if rows != batch else None)
    if prompt_mask is None:
        prompt_mask = torch.ones(batch, prompt_cache.get_seq_length(), dtype=torch.long, device=device)
    return cache, prompt_mask.to(device)


# ---- the forward ----------------------------------------------------------------------------------------


def logits_at(
    model: PreTrainedModel,
    prompt: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    rows: Tensor,
    positions: Tensor,
    then: Continuation | None = None,
    prompt_cache: Cache | None = None,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """The one forward-with-prompt: logits only where a loss or a score needs them.

    The unmodified HF model computes `[prompt; input]` in calls that share keys/values: the prompt
    positions attend only to each other, so their keys/values are the same for every row; a shared
    `[P, H]` prompt runs once at batch 1 and its cache is broadcast to the batch (gradients flow back
    through it). The inputs run on top of that cache, and `then` (if given) on top of the inputs'.
    The LM head runs only on the hidden states at (`rows[i]`, `positions[i]`), positions counted in
    `input_ids` (and then at `then`'s positions).

    Args:
        prompt: `[P, H]`, `[B, P, H]` or None (ignored when `prompt_cache` is given).
        input_ids, attention_mask: `[B, T]`, right-padded.
        rows, positions: `[N]` each.
        then: continuation rows, or None.
        prompt_cache: the prompt's keys/values, computed beforehand and left unchanged here (scoring
            reuses it for every batch): `prompt_keys_values` of one prompt (batch 1, broadcast to
            every row), or `mixed_prompt_cache`'s (one row per input row). None: computed from `prompt`.
        prompt_mask: `[B, P]`, which prompt positions each row has (`mixed_prompt_cache`'s); None: all.

    Returns:
        logits `[N, V]` in fp32 (`[N + M, V]` with `then`: the continuation positions last).

    Raises:
        RuntimeError: the model gave back a cache without the prompt's positions.
    """
    batch, width = input_ids.shape
    cache, prompt_mask = _prompt_part(model, prompt, prompt_cache, prompt_mask, batch, input_ids.device)
    num_prompt = prompt_mask.shape[1]
    prompt_lengths = prompt_mask.sum(1, keepdim=True)  # [B, 1]: where each row's input starts
    steps = torch.arange(max(width, then.input_ids.shape[1] if then is not None else 0), device=input_ids.device)
    mask = torch.cat([prompt_mask, attention_mask], dim=1)  # [B, P+T]
    use_cache = cache is not None or then is not None
    logits, cache = _forward(
        model, model.get_input_embeddings()(input_ids), mask, prompt_lengths + steps[:width], cache,
        lambda hidden: hidden[rows, positions], use_cache,  # [B, T, H] -> [N, H]
    )
    if use_cache:
        _check_cache(cache, num_prompt + width, model)
    if then is not None:
        logits = torch.cat([logits, _continue(model, then, cache, prompt_mask, prompt_lengths, width, steps)])
    return logits.float()  # [N(+M), V]


def _continue(model, then: Continuation, cache: Cache, prompt_mask: Tensor, prompt_lengths: Tensor, width: int, steps: Tensor) -> Tensor:
    """Logits `[M, V]` at `then`'s positions: its groups run on top of the first input's cache.

    Every group's last hidden states go into one `[R, K, H]` buffer; the last group's pass hands the
    head all `M` scored positions at once.
    """
    hidden = None
    for g, (begin, end, group_width) in enumerate(then.groups):
        parents, contexts = then.parents[begin:end], then.contexts[begin:end, None]  # [r], [r, 1]
        seen = (steps[:width] < contexts).long()  # [r, T]: the parent's tokens this row sees

        def keep(states: Tensor, begin=begin, end=end, last=g == len(then.groups) - 1) -> Tensor:
            nonlocal hidden
            if hidden is None:
                hidden = states.new_zeros(*then.input_ids.shape, states.shape[-1])  # [R, K, H]
            hidden[begin:end, : states.shape[1]] = states  # [r, width, H]
            return hidden[then.rows, then.positions] if last else _nothing(states)

        logits, group_cache = _forward(
            model,
            model.get_input_embeddings()(then.input_ids[begin:end, :group_width]),
            torch.cat([prompt_mask[parents], seen, then.attention_mask[begin:end, :group_width]], dim=1),
            prompt_lengths[parents] + contexts + steps[:group_width],  # the parent's later tokens sit mid-row, so positions are given
            _cache_rows(cache, parents),  # [r, heads, P+T, d] per layer
            keep,
            use_cache=True,
        )
        _check_cache(group_cache, prompt_mask.shape[1] + width + group_width, model)
    return logits  # the last group's: [M, V]


# ---- generation -----------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompt_cache: Cache | None,
    input_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    prompt_mask: Tensor | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Continue each row of `input_ids` after its prompt, batched: greedy at temperature 0, else sampled.

    The rows are left-padded inside (so every row's next token is read at the last position) with
    explicit positions: a row's prompt takes `0 .. p-1`, its tokens `p ..`. Decoding runs on top of
    the prompt's keys/values, which stay as they are.

    Args:
        prompt_cache: `prompt_keys_values` of one prompt (every row), `mixed_prompt_cache`'s (one per
            row, with its `prompt_mask`), or None (no prompt).
        input_ids: token ids of each row (any lengths, at least one token each).
        max_new_tokens: tokens to add per row at most.
        temperature: 0 for greedy; above 0, sampling from `softmax(logits / temperature)`.
        generator: seeds the sampling (on the model's device), so a run can be repeated.
        eos_token_id: a row stops after producing it (it is included).
        prompt_mask: `[B, P]`, with a mixed cache.

    Returns:
        per row, the new token ids and their log-probabilities under the model (temperature 1, fp32).

    Raises:
        ValueError: an empty row, `max_new_tokens < 1`, a negative temperature, or rows with different
            prompts that together pass a sliding window.
    """
    if not input_ids or any(len(row) == 0 for row in input_ids):
        raise ValueError("generate needs at least one row and at least one token in every row of input_ids")
    if max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and temperature={temperature} >= 0")
    num_prompt = 0 if prompt_cache is None else (prompt_cache.get_seq_length() if prompt_mask is None else prompt_mask.shape[1])
    window = sliding_window(model)
    if window is not None and len(input_ids) > 1 and num_prompt + max(map(len, input_ids)) + max_new_tokens > window:
        # the window counts cache slots, and left padding takes some: past it, each row alone is exact
        if prompt_mask is not None:
            raise ValueError(f"rows with different prompts pass the model's sliding window ({window}); generate them one prompt at a time")
        return [generate(model, prompt_cache, [row], max_new_tokens, temperature, generator, eos_token_id)[0] for row in input_ids]
    device = model.get_input_embeddings().weight.device
    width = max(map(len, input_ids))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in input_ids], device=device)  # [B, T] left-padded
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in input_ids], device=device)
    cache, prompt_mask = _prompt_part(model, None, prompt_cache, prompt_mask, len(input_ids), device)
    mask = torch.cat([prompt_mask, mask], dim=1)  # [B, P+T]
    positions = prompt_mask.sum(1, keepdim=True) + (mask[:, num_prompt:].cumsum(1) - 1).clamp(min=0)  # [B, T]
    logits, cache = _forward(model, model.get_input_embeddings()(ids), mask, positions, cache, _last, use_cache=True)
    _check_cache(cache, num_prompt + width, model)
    tokens, logprobs, done = [], [], torch.zeros(len(input_ids), dtype=torch.bool, device=device)
    position = positions[:, -1:]  # [B, 1]
    for step in range(max_new_tokens):
        token_logprobs = torch.log_softmax(logits.float(), -1)  # [B, V]
        if temperature == 0:
            token = token_logprobs.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
        tokens.append(token)
        logprobs.append(token_logprobs.gather(1, token[:, None])[:, 0])
        if eos_token_id is not None:
            done |= token == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):  # a host sync per new token: what decoding costs
            break
        mask, position = torch.cat([mask, mask.new_ones(len(input_ids), 1)], dim=1), position + 1
        logits, cache = _forward(model, model.get_input_embeddings()(token[:, None]), mask, position, cache, _last, use_cache=True)
        _check_cache(cache, mask.shape[1], model)
    return [_until_eos(row_tokens, row_logprobs, eos_token_id) for row_tokens, row_logprobs in zip(torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist())]


def _last(hidden: Tensor) -> Tensor:
    return hidden[:, -1]  # [B, T, H] -> [B, H]: left-padded, every row's next token is read at the end


def _until_eos(tokens: list[int], logprobs: list[float], eos_token_id: int | None) -> tuple[list[int], list[float]]:
    end = tokens.index(eos_token_id) + 1 if eos_token_id in tokens else len(tokens)
    return tokens[:end], logprobs[:end]
