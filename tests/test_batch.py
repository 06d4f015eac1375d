"""Token ids and batches: which positions get scored, against which targets, on legible ids."""

from __future__ import annotations

import random

import pytest
import torch

from softprompt.data.batch import Encoded, bucketed_batches, cheapest_ranges, encode, length_of, score_batch, sorted_chunks, train_batch
from softprompt.tasks.registry import Example

PAD = 0


def test_encode_drops_the_start_of_a_long_context(tokenizer):
    example = Example("one two three four five six seven eight nine ten\nAnswer:", (" he wore a hat.", " no"), 0)
    full = encode(tokenizer, example, max_length=1000)
    longest_choice = len(full.choices[0])
    short = encode(tokenizer, example, max_length=longest_choice + 4)
    assert short.context == full.context[-4:]  # the end ("...\nAnswer:") is kept
    assert length_of(short) == longest_choice + 4


def test_encode_without_room(tokenizer):
    example = Example("text", (" he wore a hat.",), 0)
    with pytest.raises(ValueError, match=r"max_length=2 leaves no room for the context \(the longest choice has 5 tokens\); raise --max-length"):
        encode(tokenizer, example, max_length=2)


def test_encode_refuses_a_choice_without_tokens(tokenizer):
    example = Example("text", (" yes", ""), 0)
    with pytest.raises(ValueError, match=r"choice '' has no tokens; every choice needs at least one"):
        encode(tokenizer, example, max_length=64)


def test_train_batch_scores_every_answer_token_with_teacher_forcing():
    items = [Encoded([5, 6, 7], ([8], [9, 10]), 1), Encoded([11], ([12], [13]), 0)]
    batch = train_batch(items, PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 10], [11, 12, PAD, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.rows.tolist() == [0, 0, 1]
    assert batch.positions.tolist() == [2, 3, 0]  # the logits at position p predict token p+1
    assert batch.targets.tolist() == [9, 10, 12]
    assert batch.segments.tolist() == [0, 0, 1]
    assert batch.pairs == [(0, 1), (1, 0)]
    assert batch.num_tokens == 7
    for row, pos, target in zip(batch.rows, batch.positions, batch.targets):
        assert batch.input_ids[row, pos + 1] == target


def test_score_batch_single_token_choices_share_one_row():
    items = [Encoded([5, 6], ([8], [9], [10]), 2), Encoded([7], ([8], [9], [10]), 0)]
    batch = score_batch(items, first_index=10, pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6], [7, PAD]]
    assert batch.rows.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.positions.tolist() == [1, 1, 1, 0, 0, 0]
    assert batch.targets.tolist() == [8, 9, 10, 8, 9, 10]
    assert batch.segments.tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.pairs == [(10, 0), (10, 1), (10, 2), (11, 0), (11, 1), (11, 2)]


def test_score_batch_multi_token_choices():
    items = [Encoded([5, 6], ([8, 9, 4], [3], [8, 9, 7], [8, 1, 2], [2, 3]), 0)]
    batch = score_batch(items, first_index=0, pad_id=PAD)
    # the context is encoded once, followed by the (first) longest choice less its last token, scored
    # by teacher forcing; every other choice reads its first token at the context's last position, and
    # its later tokens too while they are the row's ([8, 9, 7] entirely, [8, 1, 2] its 8 and 1)
    assert batch.input_ids.tolist() == [[5, 6, 8, 9]]
    assert batch.rows.tolist() == [0] * 10
    assert batch.positions.tolist() == [1, 2, 3, 1, 1, 2, 3, 1, 2, 1]
    # [8, 1, 2] continues after the context and its shared 8 (3 tokens of row 0), [2, 3] after the context
    then = batch.then
    assert then.input_ids.tolist() == [[1], [2]]
    assert then.parents.tolist() == [0, 0] and then.contexts.tolist() == [3, 2]
    assert list(zip(then.rows.tolist(), then.positions.tolist())) == [(0, 0), (1, 0)]
    assert batch.targets.tolist() == [8, 9, 4, 3, 8, 9, 7, 8, 1, 2, 2, 3]
    assert batch.segments.tolist() == [0, 0, 0, 1, 2, 2, 2, 3, 3, 4, 3, 4]


def test_score_batch_positions_see_exactly_context_and_choice_prefix():
    """For every scored token, the input up to its position is context + the choice's earlier tokens."""
    items = [
        Encoded([1, 2, 3], ([4, 5], [4, 6, 7], [8], [4, 6, 2], [4, 6, 7], [9, 9]), 1),
        Encoded([9], ([4], [5, 5, 5], [5, 4]), 1),
        Encoded([9], ([4, 3, 2, 1], [4, 3, 5, 6], [4, 7, 2, 1], [4, 3]), 0),
    ]
    batch = score_batch(items, first_index=0, pad_id=PAD)
    inputs = []
    for row, pos in zip(batch.rows, batch.positions):
        assert batch.attention_mask[row, : pos + 1].all()
        inputs.append(batch.input_ids[row, : pos + 1].tolist())
    then = batch.then
    assert then is not None and len(then.parents) == 3
    for row, pos in zip(then.rows, then.positions):
        parent = then.parents[row]
        context = batch.input_ids[parent, : then.contexts[row]].tolist()
        assert then.attention_mask[row, : pos + 1].all()
        inputs.append(context + then.input_ids[row, : pos + 1].tolist())
    seen = {}
    for seq, target, segment in zip(inputs, batch.targets, batch.segments):
        e, c = batch.pairs[segment]
        j = seen.get(int(segment), 0)
        seen[int(segment)] = j + 1
        assert seq == items[e].context + items[e].choices[c][:j]
        assert target == items[e].choices[c][j]
    assert seen == {s: len(items[e].choices[c]) for s, (e, c) in enumerate(batch.pairs)}


def test_batch_to_device_keeps_everything():
    batch = train_batch([Encoded([5], ([8],), 0)], PAD).to(torch.device("cpu"))
    assert batch.pairs == [(0, 0)] and batch.targets.tolist() == [8]


def items_of_lengths(lengths: list[int]) -> list[Encoded]:
    return [Encoded([1] * (n - 1), ([2],), 0) for n in lengths]


def test_sorted_chunks_cover_every_item_longest_first():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    chunks = sorted_chunks(items_of_lengths(lengths), batch_size=3)
    assert all(1 <= len(c) <= 3 for c in chunks)
    assert sorted(i for c in chunks for i in c) == list(range(7))
    assert [lengths[i] for c in chunks for i in c] == sorted(lengths, reverse=True)


def brute_force_cost(lengths: list[int], max_rows: int | None, pass_cost: float) -> float:
    """The cheapest cover of `lengths` by contiguous ranges, trying every set of cuts."""
    n, best = len(lengths), float("inf")
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        ranges = list(zip(cuts, cuts[1:]))
        if max_rows and any(b - a > max_rows for a, b in ranges):
            continue
        best = min(best, sum((b - a) * lengths[a] + pass_cost for a, b in ranges))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_cheapest_ranges_is_optimal(seed):
    rng = random.Random(seed)
    lengths = sorted((rng.randint(1, 60) for _ in range(rng.randint(1, 9))), reverse=True)
    max_rows = rng.choice([None, 2, 3])
    pass_cost = rng.choice([0, 5, 48])
    ranges = cheapest_ranges(lengths, max_rows, pass_cost)
    assert [a for a, _ in ranges][0] == 0 and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == len(lengths)
    assert not max_rows or all(b - a <= max_rows for a, b in ranges)
    cost = sum((b - a) * lengths[a] + pass_cost for a, b in ranges)
    assert cost == brute_force_cost(lengths, max_rows, pass_cost)


def test_cheapest_ranges_trades_padding_against_passes():
    lengths = [100, 10, 10, 10]
    assert cheapest_ranges(lengths, pass_cost=0) == [(0, 1), (1, 4)]  # no padding at all
    assert cheapest_ranges(lengths, pass_cost=1000) == [(0, 4)]  # one pass, 270 tokens of padding
    assert cheapest_ranges(lengths, max_rows=2, pass_cost=1000) == [(0, 2), (2, 4)]


def test_bucketed_batches_are_a_seeded_shuffle_of_similar_lengths():
    lengths = torch.randperm(32, generator=torch.Generator().manual_seed(3)).add(2).tolist()
    items = items_of_lengths(lengths)
    batches = bucketed_batches(items, batch_size=2, generator=torch.Generator().manual_seed(0), bucket=16)
    assert sorted(i for b in batches for i in b) == list(range(32))
    assert all(len(b) == 2 for b in batches)
    # one window of 16 batches holds all 32 items, so each batch pairs neighbours in length
    assert all(abs(lengths[a] - lengths[b]) == 1 for a, b in batches)
    again = bucketed_batches(items, batch_size=2, generator=torch.Generator().manual_seed(0), bucket=16)
    other = bucketed_batches(items, batch_size=2, generator=torch.Generator().manual_seed(1), bucket=16)
    assert batches == again and batches != other
    assert [lengths[b[0]] for b in batches] != sorted(lengths[b[0]] for b in batches)  # batch order is shuffled


def test_small_windows_give_each_seed_other_batches():
    """With windows smaller than the train set, seeds differ in which examples share a batch."""
    items = items_of_lengths([5] * 32)
    pairs = [
        {frozenset(b) for b in bucketed_batches(items, batch_size=2, generator=torch.Generator().manual_seed(seed), bucket=4)}
        for seed in (0, 1)
    ]
    assert pairs[0] != pairs[1]
