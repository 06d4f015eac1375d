"""Mixed batches (each row its own prompt, prompts of different lengths) and generation on a prompt's keys/values.

The equality tests run in every attention implementation that `--attention auto` can pick; their
references (each prompt scored alone, full forwards) always run in eager attention.
"""

from __future__ import annotations

import pytest
import torch

from conftest import use_attention, with_attention
from naive import full_logits, greedy_continuation
from softprompt.core.forward import generate, logits_at, mixed_prompt_cache, prompt_keys_values
from softprompt.data.batch import Encoded
from softprompt.eval.scoring import score, score_mixed

HIDDEN = 16


def _items(seed: int, shapes) -> list[Encoded]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 49152, (n,), generator=generator).tolist()

    return [Encoded(ids(n), tuple(ids(c) for c in choices), 0) for n, *choices in shapes]


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(["llama", "gemma", "gpt2", "bloom"]), indirect=["tiny_backbone"])
def test_mixed_prompts_score_as_each_alone(tiny_backbone, attention, eager_reference):
    """Three prompts of lengths 2, 5 and 3 and no prompt, interleaved in shared batches, multi-token
    choices (continuation rows): each item's scores equal `score` under its prompt alone (in eager)."""
    use_attention(tiny_backbone.model, attention)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(n, HIDDEN, generator=generator) for n in (2, 5, 3)]
    bank = [prompt_keys_values(tiny_backbone.model, p) for p in prompts] + [None]
    items = _items(4, [(3, 1, 4, 2), (6, 3, 3), (1, 2, 5), (4, 1, 1), (2, 5, 2, 2), (5, 2), (3, 3, 1), (2, 4, 4)])
    prompt_of = [0, 1, 2, 3, 1, 0, 3, 2]
    mixed = score_mixed(tiny_backbone, bank, prompt_of, items, batch_size=8)
    for k in range(4):
        mine = [i for i, p in enumerate(prompt_of) if p == k]
        alone = eager_reference(
            tiny_backbone.model, lambda: score(tiny_backbone, prompts[k] if k < 3 else None, [items[i] for i in mine], batch_size=2)
        )
        width = alone.logprobs.shape[-1]
        torch.testing.assert_close(mixed.logprobs[0, mine, :width], alone.logprobs[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(mixed.exact[0, mine], alone.exact[0])
    assert torch.isinf(mixed.logprobs[0, 5, 1:]).all()  # the item with one choice is -inf padded


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(["llama", "gemma"]), indirect=["tiny_backbone"])
def test_mixed_cache_positions_equal_full_forward(tiny_backbone, attention, eager_reference):
    """Row i's input starts at position len(its prompt): logits equal one full forward over [prompt_i; input_i]."""
    model = use_attention(tiny_backbone.model, attention)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randn(n, HIDDEN, generator=generator) for n in (4, 1)]
    cache, prompt_mask = mixed_prompt_cache([prompt_keys_values(model, p) for p in prompts] + [None], [1, 0, 2])
    assert prompt_mask.tolist() == [[0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    input_ids = torch.randint(5, 49152, (3, 6), generator=generator)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    rows, positions = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 5, 3, 4])
    with torch.no_grad():
        got = logits_at(model, None, input_ids, mask, rows, positions, prompt_cache=cache, prompt_mask=prompt_mask)
        row_prompts = [prompts[1], prompts[0], None]
        want = eager_reference(model, lambda: torch.stack([
            full_logits(model, row_prompts[r], input_ids[r : r + 1], mask[r : r + 1])[0, p + (0 if row_prompts[r] is None else len(row_prompts[r]))]
            for r, p in zip(rows.tolist(), positions.tolist())
        ]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bank_index_out_of_range(tiny_backbone):
    bank = [prompt_keys_values(tiny_backbone.model, torch.randn(2, HIDDEN))]
    with pytest.raises(ValueError, match="row_prompt holds 3, but the bank has 1 prompts"):
        mixed_prompt_cache(bank, [0, 3])


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(["llama", "gemma", "gpt2"]), indirect=["tiny_backbone"])
@pytest.mark.parametrize("with_prompt", [True, False], ids=["prompt", "no-prompt"])
def test_greedy_generate_equals_full_forward_loop(tiny_backbone, attention, with_prompt, eager_reference):
    model = use_attention(tiny_backbone.model, attention)
    generator = torch.Generator().manual_seed(6)
    prompt = torch.randn(3, HIDDEN, generator=generator) if with_prompt else None
    rows = [torch.randint(5, 49152, (n,), generator=generator).tolist() for n in (5, 2, 7)]  # left padding inside
    cache = None if prompt is None else prompt_keys_values(model, prompt)
    got = generate(model, cache, rows, max_new_tokens=4)
    for row, (tokens, logprobs) in zip(rows, got):
        want_tokens, want_logprobs = eager_reference(model, lambda: greedy_continuation(model, prompt, row, 4))
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-5, rtol=1e-5)
    if cache is not None:
        assert cache.get_seq_length() == 3  # the caller's prompt cache is left as it was


def test_generate_stops_a_row_at_eos(tiny_backbone):
    model = tiny_backbone.model
    rows = [[11, 12, 13], [14, 15]]
    free = generate(model, None, rows, max_new_tokens=5)
    eos = free[0][0][0]  # row 0's first new token, as the eos: row 0 stops there, row 1 goes on
    stopped = generate(model, None, rows, max_new_tokens=5, eos_token_id=eos)
    assert stopped[0] == (free[0][0][:1], free[0][1][:1])
    cut = free[1][0].index(eos) + 1 if eos in free[1][0] else 5
    assert stopped[1][0] == free[1][0][:cut] and len(free[0][0]) == 5


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_backbone):
    model = tiny_backbone.model
    cache = prompt_keys_values(model, torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(7)))
    rows = [[11, 12, 13], [14]]

    def sample(seed: int):
        return generate(model, cache, rows, 6, temperature=1.5, generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != generate(model, cache, rows, 6)  # not greedy
