"""Scoring: rank classification and greedy exact match, for one prompt or several at once.

Rank classification picks the choice with the highest summed log-likelihood. Exact match asks
whether greedy decoding reproduces the right answer's tokens; it is read off the same forward by
teacher forcing (greedy reproduces the answer iff every answer token is the argmax given the
tokens before it), so it costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from sklearn.metrics import f1_score
from torch import Tensor
from tqdm.auto import tqdm

from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Batch, Encoded, device_pass_cost, length_of, score_batch, sorted_chunks, whole_rows_batch
from softprompt.core.forward import logits_at, mixed_prompt_cache, prompt_keys_values, sliding_window


class PromptMode(str, Enum):
    SOFT = "soft"  # a trained soft prompt
    NONE = "none"  # zero-shot, no prompt
    TEXT = "text"  # the task's discrete init text, as token embeddings


@dataclass
class Scores:
    logprobs: Tensor  # [K, E, C] summed log-likelihood of each choice; -inf where an example has fewer
    exact: Tensor  # [K, E] greedy decoding reproduces the right answer
    labels: Tensor  # [E]
    answer_tokens: Tensor  # [E] tokens in each right answer

    def predictions(self) -> Tensor:
        return self.logprobs.argmax(-1)  # [K, E]

    def dev_loss(self) -> Tensor:
        """Mean cross-entropy per answer token, as in training: `[K]`."""
        right = self.logprobs.gather(-1, self.labels.expand(self.logprobs.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        return -right.sum(-1) / self.answer_tokens.sum()


def target_logprobs(logits: Tensor, targets: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """`log_softmax(logits)[i, targets[i]]` and whether `targets[i]` is the argmax, for logits `[N, V]`: `[N]`, `[N]`.

    Works on blocks of `block` rows and writes no `[N, V]` log-softmax. The default is 8 rows on a
    CPU, where each block is read while it is still in cache: with one thread, 2.6x faster than
    `logsumexp` and `argmax` over a whole `[373, 49152]` (COPA-batch-sized) tensor, 36 ms against
    94 ms. On a GPU it is all rows in one block, since cache blocks would only add kernel launches
    there (not measured). Ties go to the first maximal token, as in `argmax`.
    """
    block = block or (8 if logits.device.type == "cpu" else max(1, logits.shape[0]))
    logprobs, greedy = [], []
    for rows, wanted in zip(logits.split(block), targets.split(block)):
        top, best = rows.max(-1)
        log_total = (rows - top[:, None]).exp_().sum(-1).log_() + top
        logprobs.append(rows.gather(-1, wanted[:, None])[:, 0] - log_total)
        greedy.append(best == wanted)
    return torch.cat(logprobs), torch.cat(greedy)


def _batch_builder(model, prompt_length: int, items: list[Encoded]):
    """`score_batch` (contexts encoded once), or `whole_rows_batch` where a sliding window would make that wrong.

    A sliding-window layer counts cache slots, not positions: a continuation row's slots include its
    parent row's hidden tail, and a left-padded prompt's its padding. While prompt + row + continuation
    fit in the window, every key is visible either way and the numbers are the same.
    """
    window = sliding_window(model)
    longest_row = max(length_of(item) for item in items) - 1
    longest_rest = max(len(c) for item in items for c in item.choices) - 1
    if window is None or prompt_length + longest_row + longest_rest <= window:
        return score_batch, True
    return whole_rows_batch, False


def _collect(batch: Batch, chunk: list[int], items: list[Encoded], token_lp: Tensor, greedy_wrong: Tensor, logprobs: Tensor, wrong_tokens: Tensor) -> None:
    """Sum a batch's per-token `[K, N]` log-probs and greedy misses into its (example, choice) cells of `[K, E, C]`, `[K, E]`."""
    segments = batch.segments.cpu()
    k = token_lp.shape[0]
    seg_lp = torch.zeros(k, len(batch.pairs)).index_add_(1, segments, token_lp)
    seg_wrong = torch.zeros(k, len(batch.pairs), dtype=torch.long).index_add_(1, segments, greedy_wrong)
    for s, (e, c) in enumerate(batch.pairs):
        example = chunk[e]
        logprobs[:, example, c] = seg_lp[:, s]
        if c == items[example].label:
            wrong_tokens[:, example] = seg_wrong[:, s]


def _empty_scores(k: int, items: list[Encoded]) -> tuple[Tensor, Tensor]:
    max_choices = max(len(item.choices) for item in items)
    return torch.full((k, len(items), max_choices), float("-inf")), torch.zeros((k, len(items)), dtype=torch.long)


def _scores(items: list[Encoded], logprobs: Tensor, wrong_tokens: Tensor) -> Scores:
    labels = torch.tensor([item.label for item in items])
    answer_tokens = torch.tensor([len(item.choices[item.label]) for item in items])
    return Scores(logprobs, wrong_tokens == 0, labels, answer_tokens)


@torch.inference_mode()
def score(
    backbone: Backbone, prompts: Tensor | None, items: list[Encoded], batch_size: int = 16, progress: bool = False
) -> Scores:
    """Log-likelihood of every choice of every item under each prompt.

    Runs on `backbone.scoring()`: the fp32 reference beside low-precision training weights (`--dtype
    auto`), so reported numbers are fp32's. Measured on CB/RTE val (bench/parity.json), re-scoring only
    bf16's near ties in fp32 had to redo 63-84% of the examples and ran slower than fp32 alone.

    Args:
        prompts: `[P, H]` one prompt, `[K, P, H]` several scored on each batch (ensembling), or None.
        items: encoded examples.
        batch_size: examples per forward.

    Returns:
        Scores with K = 1 for a single prompt or None.
    """
    if prompts is not None and prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)
    model, device, pad_id = backbone.scoring().model, backbone.device, backbone.tokenizer.pad_token_id
    k = 1 if prompts is None else prompts.shape[0]
    if prompts is not None:
        prompts = prompts.to(device)
    logprobs, wrong_tokens = _empty_scores(k, items)
    build, _ = _batch_builder(model, 0 if prompts is None else prompts.shape[1], items)
    caches = [None] * k if prompts is None else [prompt_keys_values(model, prompt) for prompt in prompts]  # once per prompt
    cost = device_pass_cost(device.type)
    for chunk in tqdm(sorted_chunks(items, batch_size, cost), desc="scoring", disable=not progress, leave=False):
        batch = build([items[i] for i in chunk], 0, pad_id, cost).to(device)
        n = batch.targets.shape[0]
        token_lp, greedy_wrong = torch.zeros(k, n), torch.zeros(k, n, dtype=torch.long)
        for j in range(k):  # one forward per prompt, on top of its keys/values computed once for all batches
            logits = logits_at(
                model, None, batch.input_ids, batch.attention_mask, batch.rows, batch.positions, batch.then, caches[j]
            )  # [N, V]
            lp, greedy = target_logprobs(logits, batch.targets)
            token_lp[j], greedy_wrong[j] = lp.cpu(), (~greedy).long().cpu()
        _collect(batch, chunk, items, token_lp, greedy_wrong, logprobs, wrong_tokens)
    return _scores(items, logprobs, wrong_tokens)


@torch.inference_mode()
def score_mixed(
    backbone: Backbone, prompt_caches: list, prompt_of: list[int], items: list[Encoded], batch_size: int = 16, progress: bool = False
) -> Scores:
    """Every item scored under its own prompt; items of different prompts share forwards.

    Args:
        prompt_caches: the bank, `prompt_keys_values(backbone.scoring().model, prompt)` of each
            `[P_k, H]` prompt (any lengths; None: no prompt).
        prompt_of: `[E]` index into the bank of each item's prompt.
        items: encoded examples.
        batch_size: examples per forward.

    Returns:
        Scores with K = 1: `logprobs[0]` is `[E, C]` (summed log-likelihood of each choice, -inf where
        an item has fewer), `exact[0]` is `[E]`.

    Raises:
        ValueError: `prompt_of` and `items` differ in length, or an index is outside the bank.
    """
    if len(prompt_of) != len(items):
        raise ValueError(f"prompt_of has {len(prompt_of)} entries for {len(items)} items; give one bank index per item")
    model, device, pad_id = backbone.scoring().model, backbone.device, backbone.tokenizer.pad_token_id
    lengths = [0 if cache is None else cache.get_seq_length() for cache in prompt_caches]
    build, shared = _batch_builder(model, max((lengths[k] for k in set(prompt_of)), default=0), items)
    # Past a sliding window, a left-padded prompt would shift what the window sees: one prompt per batch then.
    groups = [list(range(len(items)))] if shared else [[i for i, p in enumerate(prompt_of) if p == k] for k in sorted(set(prompt_of))]
    logprobs, wrong_tokens = _empty_scores(1, items)
    cost = device_pass_cost(device.type)
    chunks = [[group[i] for i in chunk] for group in groups for chunk in sorted_chunks([items[i] for i in group], batch_size, cost)]
    for chunk in tqdm(chunks, desc="scoring", disable=not progress, leave=False):
        batch = build([items[i] for i in chunk], 0, pad_id, cost).to(device)
        if shared:
            cache, prompt_mask = mixed_prompt_cache(prompt_caches, [prompt_of[i] for i in chunk])
        else:  # one prompt in the batch, and whole rows (several a item): its own cache, broadcast
            cache, prompt_mask = prompt_caches[prompt_of[chunk[0]]], None
        logits = logits_at(
            model, None, batch.input_ids, batch.attention_mask, batch.rows, batch.positions, batch.then, cache, prompt_mask
        )  # [N, V]
        lp, greedy = target_logprobs(logits, batch.targets)
        _collect(batch, chunk, items, lp.cpu()[None], (~greedy).long().cpu()[None], logprobs, wrong_tokens)
    return _scores(items, logprobs, wrong_tokens)


def metrics(scores: Scores, prompt_index: int = 0) -> dict[str, float]:
    """Accuracy (rank classification), exact match, macro-F1 and dev loss for one prompt, in percent."""
    predicted = scores.predictions()[prompt_index]
    labels = scores.labels
    return {
        "accuracy": 100.0 * float((predicted == labels).float().mean()),
        "exact_match": 100.0 * float(scores.exact[prompt_index].float().mean()),
        "macro_f1": 100.0 * float(f1_score(labels.numpy(), predicted.numpy(), average="macro", zero_division=0)),
        "loss": float(scores.dev_loss()[prompt_index]),
        "n": len(labels),
    }
