"""Gemma 3's sliding-window layers, with prompt + context past the window: scores still equal the naive ones.

The window is made tiny (6 tokens) so that short rows pass it. Where a continuation row or a
left-padded prompt would make the window see the wrong tokens, scoring falls back to whole rows.
The equality tests run in every attention implementation that `--attention auto` can pick (the window's
mask is built differently for each); the naive side always runs in eager attention.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, offered_attention, use_attention
from naive import greedy_continuation, naive_logprobs
from factories import model_from_config
from softprompt.core.forward import generate, prompt_keys_values, sliding_window
from softprompt.data.batch import Encoded
from softprompt.eval import scoring
from softprompt.eval.scoring import score, score_mixed

WINDOW = 6
ATTENTIONS = offered_attention(TINY_CONFIGS["gemma"])


@pytest.fixture
def gemma_small_window(tokenizer):
    return model_from_config({**TINY_CONFIGS["gemma"], "sliding_window": WINDOW}, tokenizer, seed=0)


def _items() -> list[Encoded]:
    generator = torch.Generator().manual_seed(8)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 49152, (n,), generator=generator).tolist()

    return [Encoded(ids(n), tuple(ids(c) for c in choices), 0) for n, *choices in [(9, 3, 4), (2, 4, 2, 3), (12, 1, 3), (5, 2, 2)]]


def test_the_window_is_seen(gemma_small_window):
    assert sliding_window(gemma_small_window.model) == WINDOW


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("prompt_length", [0, 3, 8], ids=["no-prompt", "prompt", "prompt-past-window"])
def test_scores_past_the_window_equal_naive(gemma_small_window, attention, prompt_length, eager_reference):
    model = use_attention(gemma_small_window.model, attention)
    prompt = torch.randn(prompt_length, 16, generator=torch.Generator().manual_seed(9)) if prompt_length else None
    items = _items()
    got = score(gemma_small_window, prompt, items, batch_size=4).logprobs[0]
    torch.testing.assert_close(got, eager_reference(model, lambda: naive_logprobs(model, prompt, items)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_mixed_prompts_past_the_window_equal_naive(gemma_small_window, attention, eager_reference):
    model = use_attention(gemma_small_window.model, attention)
    generator = torch.Generator().manual_seed(10)
    prompts = [torch.randn(n, 16, generator=generator) for n in (1, 4)]
    items = _items()
    prompt_of = [0, 1, 2, 1]
    got = score_mixed(gemma_small_window, [prompt_keys_values(model, p) for p in prompts] + [None], prompt_of, items, 4)
    for i, k in enumerate(prompt_of):
        want = eager_reference(model, lambda: naive_logprobs(model, prompts[k] if k < 2 else None, [items[i]])[0])
        torch.testing.assert_close(got.logprobs[0, i, : len(want)], want, atol=1e-4, rtol=1e-5)


def test_the_continuation_path_would_be_wrong_here(gemma_small_window, monkeypatch):
    """Why the fallback exists: forcing continuation rows past the window changes the numbers."""
    monkeypatch.setattr(scoring, "_batch_builder", lambda *args: (scoring.score_batch, True))
    items = _items()
    got = score(gemma_small_window, None, items, batch_size=4).logprobs[0]
    assert not torch.allclose(got, naive_logprobs(gemma_small_window.model, None, items), atol=1e-3)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_generate_past_the_window_equals_naive(gemma_small_window, attention, eager_reference):
    model = use_attention(gemma_small_window.model, attention)
    prompt = torch.randn(2, 16, generator=torch.Generator().manual_seed(11))
    rows = [[11, 12, 13, 14, 15], [16, 17]]
    got = generate(model, prompt_keys_values(model, prompt), rows, max_new_tokens=4)
    for row, (tokens, _) in zip(rows, got):
        assert tokens == eager_reference(model, lambda: greedy_continuation(model, prompt, row, 4)[0])
