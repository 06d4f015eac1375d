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

from softprompt.core.forward import Continuation
from softprompt.tasks.registry import Example


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
    """Token ids of the shared context and of each choice, split off joint encodings of context + choice.

    As lm-evaluation-harness does, trailing whitespace of the context moves onto the choices and
    each `context + choice` is encoded whole, so a tokenizer that merges across the boundary or adds a
    dummy prefix (SentencePiece's `▁`) gives the same ids as for the full string: for every choice,
    `context + choices[c] == tokenizer(example.text + example.choices[c])["input_ids"]` (untruncated).
    The context is what every joint encoding shares: at most the context's own encoding, less where
    the encodings disagree; the rest goes into each choice. Special tokens the tokenizer puts first
    (BOS) stay first: a long context loses tokens from its start after them. The soft prompt goes
    before all of it, BOS included, as PEFT puts its virtual tokens, so training, scoring and an
    exported adapter see one sequence: `[prompt; BOS; context; choice]`.

    Raises:
        ValueError: a choice has no tokens, or `max_length` leaves no room for the context.
    """
    context, choices = split_joint(tokenizer, example.text, example.choices)
    room = max_length - max(len(c) for c in choices)
    prefix = special_prefix(tokenizer, context)
    if room < prefix + 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the context (the longest choice has "
            f"{max(len(c) for c in choices)} tokens); raise --max-length"
        )
    if len(context) > room:
        context = context[:prefix] + context[len(context) - room + prefix :]  # [BOS] + the context's end
    return Encoded(context, choices, example.label)


def split_joint(tokenizer: PreTrainedTokenizerBase, text: str, choices: tuple[str, ...]) -> tuple[list[int], tuple[list[int], ...]]:
    """(shared context ids, each choice's ids) with `context + choice_ids == tokenizer(text + choice)`.

    Raises:
        ValueError: a choice adds no tokens to the context.
    """
    alone = tokenizer(text.rstrip())["input_ids"]  # lm-eval: the context's trailing whitespace joins the choice
    joint = [tokenizer(text + choice)["input_ids"] for choice in choices]
    for choice, ids in zip(choices, joint):
        if not choice or ids == alone:  # it would score log-likelihood 0, the best there is
            raise ValueError(f"choice {choice!r} has no tokens; every choice needs at least one")
    # the longest prefix every joint encoding shares, within the context's own encoding; >= 1 token a choice
    shared = min(len(alone), *(len(ids) - 1 for ids in joint), *(_common_prefix(ids, joint[0]) for ids in joint))
    return joint[0][:shared], tuple(ids[shared:] for ids in joint)


def special_prefix(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """How many of `ids`' first tokens are special (BOS, a template's control tokens): truncation keeps them."""
    special = set(tokenizer.all_special_ids)
    return next((i for i, token in enumerate(ids) if token not in special), len(ids))


def pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask: `[len(sequences), longest]` each."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def _build(sequences: list[list[int]], scored: list[tuple[int, int, int, int]], pairs: list[tuple[int, int]], pad_id: int) -> Batch:
    ids, mask = pad(sequences, pad_id)
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


PASS_COSTS = {"cpu": 48, "cuda": 512}
"""What one more forward pass costs, in padded tokens, per device type. A pass reads every weight of
the model once (half a GB for SmolLM2-135M in fp32). CPU: with one thread a 1-token pass takes
42 ms, while each token of a big pass adds 1.75 ms, and small passes also run their matmuls less
efficiently; of 0, 48, 100 and 200 tried on 32 COPA val examples, 48 and 100 were fastest (within
5% of each other) and 0 was 1.9x slower. CUDA: a GPU runs a few hundred tokens of a small model in
about the time of one (launch- and weight-read-bound), so a pass is worth far more padding; 512 is
a guess, not measured. Batching trades padding against passes at this rate."""
PASS_COST = PASS_COSTS["cpu"]


def device_pass_cost(device_type: str) -> float:
    """`PASS_COSTS` for a device type (`cpu`, `cuda`); other devices get the CPU's."""
    return PASS_COSTS.get(device_type, PASS_COST)


def whole_rows_batch(items: list[Encoded], first_index: int, pad_id: int, pass_cost: float = PASS_COST) -> Batch:
    """One row per (item, choice): the context and all but the last token of the choice, no continuation rows.

    For models whose sliding-window attention would see a continuation row's context wrongly (its
    window counts cache slots, and the parent row's hidden tail takes some): each row stands alone.
    """
    rows, scored, pairs = [], [], []
    for offset, item in enumerate(items):
        n = len(item.context)
        for c, choice in enumerate(item.choices):
            row, segment = len(rows), len(pairs)
            rows.append(item.context + choice[:-1])
            pairs.append((first_index + offset, c))
            scored += [(row, n - 1 + j, token, segment) for j, token in enumerate(choice)]
    return _build(rows, scored, pairs, pad_id)


def score_batch(items: list[Encoded], first_index: int, pad_id: int, pass_cost: float = PASS_COST) -> Batch:
    """One row per item: its context, then its longest multi-token choice; other choices read what they share.

    A row is the context followed by all but the last token of the item's longest choice (of more
    than one token). A choice's token `j` is read at the row's position `context + j - 1` for as long
    as the choice's earlier tokens are the ones in the row: every choice's first token (so single-token
    choices cost nothing beyond the context), the longest choice's every token (teacher forcing),
    and the tokens another choice shares with it ("The man ..." and "The woman ..." share "The").
    The rest of a choice goes into a continuation row that attends to the parent row's context and
    the shared tokens only. So the context is encoded once per example. Continuation rows are sorted
    longest first and run in the groups `cheapest_ranges` picks.
    """
    rows, scored, pairs = [], [], []
    continuations = []  # (tokens, parent row, parent tokens it sees, [(position, target, segment)])
    for offset, item in enumerate(items):
        row, n = len(rows), len(item.context)
        ride = max(item.choices, key=len)[:-1]  # the first longest choice, less its last token
        rows.append(item.context + ride)
        for c, choice in enumerate(item.choices):
            segment = len(pairs)
            pairs.append((first_index + offset, c))
            read = min(_common_prefix(choice, ride), len(choice) - 1)  # choice[: read + 1] is read off the row
            scored += [(row, n - 1 + j, choice[j], segment) for j in range(read + 1)]
            if read + 1 < len(choice):
                rest = [(j, token, segment) for j, token in enumerate(choice[read + 1 :])]
                continuations.append((choice[read:-1], row, n + read, rest))
    batch = _build(rows, scored, pairs, pad_id)
    if not continuations:
        return batch
    continuations.sort(key=lambda c: -len(c[0]))
    next_scored = [(r, j, token, segment) for r, (*_, tokens) in enumerate(continuations) for j, token, segment in tokens]
    ids, mask = pad([tokens for tokens, *_ in continuations], pad_id)
    cont_rows, cont_positions, targets, segments = (torch.tensor(col, dtype=torch.long) for col in zip(*next_scored))
    parents = torch.tensor([parent for _, parent, _, _ in continuations])
    contexts = torch.tensor([n for _, _, n, _ in continuations])
    lengths = [len(tokens) for tokens, *_ in continuations]  # longest first
    groups = [(start, end, lengths[start]) for start, end in cheapest_ranges(lengths, pass_cost=pass_cost)]
    batch.then = Continuation(ids, mask, parents, contexts, cont_rows, cont_positions, groups)
    batch.targets = torch.cat([batch.targets, targets])
    batch.segments = torch.cat([batch.segments, segments])
    return batch


def cheapest_ranges(lengths: list[int], max_rows: int | None = None, pass_cost: float = PASS_COST) -> list[tuple[int, int]]:
    """Cut rows sorted longest first into ranges `[start, end)`, one forward pass each.

    Minimises padded tokens (every row padded to its range's first, longest row) plus `pass_cost`
    per range, with at most `max_rows` rows a range: exact, by dynamic programming over the cuts.
    """
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[i]: cheapest cover of rows [0, i)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows) if max_rows else 0, end):
            cost = best[start] + (end - start) * lengths[start] + pass_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    ranges, end = [], n
    while end > 0:
        ranges.append((cut[end], end))
        end = cut[end]
    return ranges[::-1]


def length_of(item: Encoded) -> int:
    return len(item.context) + max(len(c) for c in item.choices)


def sorted_chunks(items: list[Encoded], batch_size: int, pass_cost: float = PASS_COST) -> list[list[int]]:
    """Indices in batches of similar row length (longest first), for evaluation.

    A row is `score_batch`'s: the context and the longest choice. At most `batch_size` items a batch;
    where to cut is `cheapest_ranges`' trade of padding against passes (a batch with continuation
    rows costs two at least: rows, then continuations).
    """
    order = sorted(range(len(items)), key=lambda i: -length_of(items[i]))
    continues = any(sum(len(c) > 1 for c in item.choices) > 1 for item in items)
    ranges = cheapest_ranges([length_of(items[i]) - 1 for i in order], batch_size, (2 if continues else 1) * pass_cost)
    return [order[start:end] for start, end in ranges]


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
