"""The one forward-with-prompt: `[prompt; input]` through the unmodified Hugging Face model.

Logits are computed only where a loss or a score needs them. The prompt's keys/values are
computed once (per training step, per `score` call) and the rows run on top of them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel


def prepend(prompt: Tensor | None, inputs_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """`[prompt; input]` for a right-padded batch.

    Args:
        prompt: `[P, H]` shared by every row, `[B, P, H]` one per row, or None (no prompt).
        inputs_embeds: `[B, T, H]`.
        attention_mask: `[B, T]`.

    Returns:
        embeds `[B, P+T, H]` in the model's dtype and mask `[B, P+T]`.
    """
    if prompt is None:
        return inputs_embeds, attention_mask
    batch = inputs_embeds.shape[0]
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(batch, -1, -1)
    prompt = prompt.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    embeds = torch.cat([prompt, inputs_embeds], dim=1)  # [B, P+T, H]
    prompt_mask = attention_mask.new_ones(batch, prompt.shape[1])
    return embeds, torch.cat([prompt_mask, attention_mask], dim=1)


def output_logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """The LM head on selected hidden states `[N, H]`: logits `[N, V]` (Gemma's soft-capping included)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


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


def _cache_rows(cache, index: Tensor):
    """A cache of rows `index` of `cache`, which stays as it is (its layers are shallow-copied first)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(index)
    return selected


def prompt_keys_values(model: PreTrainedModel, prompt: Tensor):
    """The cache of a prompt run alone: `[P, H]` at batch 1 (or `[B, P, H]`), what `logits_at` puts before the rows.

    Scoring computes it once per prompt and hands it to every `logits_at` call; training lets
    `logits_at` compute it, since the prompt changes every step.
    """
    prompts = prompt.unsqueeze(0) if prompt.dim() == 2 else prompt  # [1 or B, P, H]
    embedding = model.get_input_embeddings().weight
    prompts = prompts.to(device=embedding.device, dtype=embedding.dtype)
    return model.base_model(inputs_embeds=prompts, use_cache=True).past_key_values


def logits_at(
    model: PreTrainedModel,
    prompt: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    rows: Tensor,
    positions: Tensor,
    then: Continuation | None = None,
    prompt_cache=None,
) -> Tensor:
    """The one forward-with-prompt: logits only where a loss or a score needs them.

    The unmodified HF model computes `[prompt; input]` in calls that share keys/values: the prompt
    positions attend only to each other, so their keys/values are the same for every row; a shared
    `[P, H]` prompt runs once at batch 1 and its cache is broadcast to the batch (gradients flow back
    through it). The inputs run on top of that cache, and `then` (if given) on top of the inputs'.
    The LM head runs only on the hidden states at (`rows[i]`, `positions[i]`), positions counted in
    `input_ids` (and then at `then`'s positions).

    Args:
        prompt: `[P, H]`, `[B, P, H]` or None.
        input_ids, attention_mask: `[B, T]`, right-padded.
        rows, positions: `[N]` each.
        then: continuation rows, or None.
        prompt_cache: `prompt_keys_values(model, prompt)` of a `[P, H]` prompt, computed beforehand
            and left unchanged here (scoring reuses it for every batch); None computes it.

    Returns:
        logits `[N, V]` in fp32 (`[N + M, V]` with `then`: the continuation positions last).
    """
    inputs_embeds = model.get_input_embeddings()(input_ids)  # [B, T, H]
    cache, mask = None, attention_mask
    if prompt is not None:
        cache = prompt_keys_values(model, prompt) if prompt_cache is None else prompt_cache
        if prompt.dim() == 2:  # [1, heads, P, d] -> [B, heads, P, d] per layer, in a new cache
            cache = _cache_rows(cache, input_ids.new_zeros(input_ids.shape[0]))
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prompt.shape[-2]), attention_mask], dim=1)  # [B, P+T]
    use_cache = cache is not None or then is not None
    out = model.base_model(inputs_embeds=inputs_embeds, attention_mask=mask, past_key_values=cache, use_cache=use_cache)
    selected = out.last_hidden_state[rows, positions]  # [N, H]
    if then is not None:
        num_prompt = mask.shape[1] - input_ids.shape[1]
        hidden = selected.new_zeros(*then.input_ids.shape, selected.shape[-1])  # [R, K, H]
        steps = torch.arange(max(input_ids.shape[1], then.input_ids.shape[1]), device=input_ids.device)
        for begin, end, width in then.groups:
            parents, contexts = then.parents[begin:end], then.contexts[begin:end, None]  # [r], [r, 1]
            seen = (steps[: input_ids.shape[1]] < contexts).long()  # [r, T]: the parent's tokens this row sees
            hidden[begin:end, :width] = model.base_model(
                inputs_embeds=model.get_input_embeddings()(then.input_ids[begin:end, :width]),
                attention_mask=torch.cat([mask[parents, :num_prompt], seen, then.attention_mask[begin:end, :width]], dim=1),
                position_ids=num_prompt + contexts + steps[:width],  # the parent's later tokens sit mid-row, so positions are given
                past_key_values=_cache_rows(out.past_key_values, parents),  # [r, heads, P+T, d] per layer
                use_cache=True,
            ).last_hidden_state  # [r, width, H]
        selected = torch.cat([selected, hidden[then.rows, then.positions]])
    return output_logits(model, selected)  # [N(+M), V]


# The FFN's output projection in each decoder layer (Llama/Gemma/Mistral, GPT-2, BLOOM, OPT/Phi):
# its input `[B, T, I]` is the layer's FFN activation, read by a hook rather than a copy of the forward.
FFN_OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2")


def ffn_output_projections(model: PreTrainedModel) -> list[torch.nn.Module]:
    """Each decoder layer's FFN output projection, in layer order.

    Raises:
        ValueError: the architecture names it otherwise (the message lists the names looked for).
    """
    found = [module for name, module in model.named_modules() if name.endswith(FFN_OUTPUT_PROJECTIONS)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no FFN output projection named {', '.join(FFN_OUTPUT_PROJECTIONS)}; "
            "add its module name to softprompt.core.forward.FFN_OUTPUT_PROJECTIONS"
        )
    return found


@torch.no_grad()
def ffn_activation_rates(model: PreTrainedModel, prompt: Tensor | None, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """How often each FFN neuron is active (> 0) on the input tokens of a batch run after `prompt`.

    The batch goes through `logits_at` (the one forward); forward pre-hooks on each layer's FFN
    output projection count, per neuron, the real (unpadded) input tokens where its activation is
    positive. The prompt's own positions are not counted: in a causal model they do not see the
    input, so they would be the same for every probe.

    Args:
        prompt: `[P, H]` or None; input_ids, attention_mask: `[B, T]`, right-padded.

    Returns:
        `[L, I]` rates in [0, 1] (L layers, I FFN neurons per layer), fp32 on CPU.
    """
    cache = None if prompt is None else prompt_keys_values(model, prompt)  # before the hooks: prompt positions uncounted
    real = attention_mask.bool()  # [B, T]
    counts: list[Tensor] = []
    record = lambda module, args: counts.append((args[0] > 0)[real].sum(0).float().cpu())  # noqa: E731  [I] per layer
    handles = [module.register_forward_pre_hook(record) for module in ffn_output_projections(model)]
    try:
        first = input_ids.new_zeros(1)
        logits_at(model, prompt, input_ids, attention_mask, first, first, prompt_cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(counts) / real.sum().cpu()
