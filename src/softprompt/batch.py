"""Token ids for examples and right-padded, length-bucketed batches that say where to score.

A batch carries, besides ids and mask, the flat list of positions whose next-token logits are
needed (`rows`, `positions`), the token expected there (`targets`) and which (example, choice)
pair each belongs to (`segments`). The forward computes logits at those positions only. A scoring
batch encodes each context once; multi-token choices continue from it (`then`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from softprompt.prompt import Continuation
from softprompt.tasks import Example


@dataclass(frozen=True)
class Encoded:
    context: list[int]
    choices: tuple[list[int], ...]
    label: int


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    rows: Tensor  # [N] row of each scored position
    positions: Tensor  # [N] position in input_ids whose logits predict targets[i]
    targets: Tensor  # [N]
    segments: Tensor  # [N] index into `pairs`
    pairs: list[tuple[int, int]]  # (example index, choice index) of each segment
    then: Continuation | None = None  # rows continuing these rows; their scored positions come after rows'

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, (Tensor, Continuation)) else v for k, v in vars(self).items()}
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """Token ids of the context and of each choice; the context loses tokens from its start if needed.

    Raises:
        ValueError: `max_length` leaves no room for the context.
    """
    context = tokenizer(example.text)["input_ids"]
    choices = tuple(tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in example.choices)
    room = max_length - max(len(c) for c in choices)
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the context; raise --max-length")
    return Encoded(context[-room:], choices, example.label)


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def _build(sequences: list[list[int]], scored: list[tuple[int, int, int, int]], pairs: list[tuple[int, int]], pad_id: int) -> Batch:
    ids, mask = _pad(sequences, pad_id)
    rows, positions, targets, segments = (torch.tensor(col, dtype=torch.long) for col in zip(*scored))
    return Batch(ids, mask, rows, positions, targets, segments, pairs)


def train_batch(items: list[Encoded], pad_id: int) -> Batch:
    """Each row is context + the right answer; every answer token is scored (teacher forcing)."""
    sequences, scored, pairs = [], [], []
    for row, item in enumerate(items):
        answer = item.choices[item.label]
        sequences.append(item.context + answer)
        pairs.append((row, item.label))
        for j, token in enumerate(answer):
            scored.append((row, len(item.context) - 1 + j, token, row))
    return _build(sequences, scored, pairs, pad_id)


def score_batch(items: list[Encoded], first_index: int, pad_id: int) -> Batch:
    """One row per item's context, plus one continuation row per multi-token choice.

    Every choice's first token is scored at the context's last position; a choice of k > 1 tokens
    adds a continuation row (its first k-1 tokens, on top of the context's encoding) for the rest.
    So the context is encoded once per example, and single-token choices cost nothing beyond it.
    """
    contexts, scored, pairs = [], [], []
    continuations, parents, next_scored = [], [], []
    for offset, item in enumerate(items):
        row = len(contexts)
        contexts.append(item.context)
        for c, choice in enumerate(item.choices):
            segment = len(pairs)
            pairs.append((first_index + offset, c))
            scored.append((row, len(item.context) - 1, choice[0], segment))
            if len(choice) > 1:
                for j, token in enumerate(choice[1:]):
                    next_scored.append((len(continuations), j, token, segment))
                continuations.append(choice[:-1])
                parents.append(row)
    batch = _build(contexts, scored, pairs, pad_id)
    if not continuations:
        return batch
    ids, mask = _pad(continuations, pad_id)
    rows, positions, targets, segments = (torch.tensor(col, dtype=torch.long) for col in zip(*next_scored))
    batch.then = Continuation(ids, mask, torch.tensor(parents), rows, positions)
    batch.targets = torch.cat([batch.targets, targets])
    batch.segments = torch.cat([batch.segments, segments])
    return batch


def length_of(item: Encoded) -> int:
    return len(item.context) + max(len(c) for c in item.choices)


def sorted_chunks(items: list[Encoded], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), for evaluation."""
    order = sorted(range(len(items)), key=lambda i: -length_of(items[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def bucketed_batches(items: list[Encoded], batch_size: int, generator: torch.Generator, bucket: int = 8) -> list[list[int]]:
    """Shuffled training batches with little padding.

    The data is shuffled, cut into windows of `bucket` batches, sorted by length inside each window,
    batched, and the batches shuffled again: random order, similar lengths within a batch. The
    window is kept small (8 batches) so that on a small train set each seed still gets batches of
    different examples, not only the same batches in another order.
    """
    order = torch.randperm(len(items), generator=generator).tolist()
    window = batch_size * bucket
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: length_of(items[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
