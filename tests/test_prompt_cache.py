"""logits_at reuses keys/values (a shared prompt once, a shared context once): same numbers as `[prompt; input]`.

The equality tests run in every attention implementation that `--attention auto` can pick; the naive
side always runs in eager attention (the ground truth).
"""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, use_attention, with_attention
from naive import full_logits, naive_logprobs
import softprompt.data.batch
from softprompt.data.batch import Encoded, encode
from softprompt.eval.scoring import score
from softprompt.core.forward import logits_at
from softprompt.tasks.registry import get_task, load_examples


def _concatenated(model, prompt, input_ids, attention_mask, rows, positions):
    """The textbook forward: one pass over `[prompt; input]` for every row."""
    return full_logits(model, prompt, input_ids, attention_mask)[rows, positions + prompt.shape[-2]]


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(ARCHITECTURES), indirect=["tiny_backbone"])
@pytest.mark.parametrize("num_tokens", [5, 70], ids=["short", "past-sliding-window"])
def test_cached_prompt_matches_concatenation(tiny_backbone, attention, num_tokens, eager_reference):
    torch.manual_seed(0)
    model = use_attention(tiny_backbone.model, attention)
    input_ids = torch.randint(0, 49152, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0  # right padding
    rows, positions = torch.tensor([0, 1, 2, 0]), torch.tensor([11, 6, 2, 5])
    ours = torch.nn.Parameter(torch.randn(num_tokens, 16))
    reference = torch.nn.Parameter(ours.detach().clone())

    def concatenated():
        plain = _concatenated(model, reference, input_ids, mask, rows, positions)
        plain.logsumexp(-1).sum().backward()
        return plain.detach(), reference.grad.clone()

    cached = logits_at(model, ours, input_ids, mask, rows, positions)
    cached.logsumexp(-1).sum().backward()
    plain, reference_grad = eager_reference(model, concatenated)

    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.grad, reference_grad, atol=1e-6, rtol=1e-4)
    assert reference_grad.abs().max() > 0


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(ARCHITECTURES), indirect=["tiny_backbone"])
@pytest.mark.parametrize("task", ["copa", "cb"])
@pytest.mark.parametrize("with_prompt", [True, False], ids=["prompt", "no-prompt"])
def test_shared_context_scoring_matches_naive(tiny_backbone, attention, data_dir, task, with_prompt, eager_reference):
    model = use_attention(tiny_backbone.model, attention)
    items = [encode(tiny_backbone.tokenizer, e, 64) for e in load_examples(get_task(task), "val", data_dir)[:5]]
    prompt = torch.randn(3, 16) if with_prompt else None
    scores = score(tiny_backbone, prompt, items, batch_size=4)
    naive = eager_reference(model, lambda: naive_logprobs(model, prompt, items))
    torch.testing.assert_close(scores.logprobs[0], naive, atol=1e-4, rtol=1e-5)


def test_several_prompts_score_as_each_alone(tiny_backbone, data_dir):
    items = [encode(tiny_backbone.tokenizer, e, 64) for e in load_examples(get_task("copa"), "val", data_dir)[:4]]
    prompts = torch.randn(2, 3, 16)
    together = score(tiny_backbone, prompts, items, batch_size=3).logprobs
    alone = torch.stack([score(tiny_backbone, p, items, batch_size=2).logprobs[0] for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(ARCHITECTURES), indirect=["tiny_backbone"])
def test_continuation_groups_match_naive(tiny_backbone, attention, monkeypatch, eager_reference):
    """Many multi-token choices of different lengths, each length its own continuation pass (no
    padding allowed), several batches sharing one prompt cache: still the naive numbers."""
    model = use_attention(tiny_backbone.model, attention)
    exact = softprompt.data.batch.cheapest_ranges
    monkeypatch.setattr(softprompt.data.batch, "cheapest_ranges", lambda lengths, max_rows=None, pass_cost=0: exact(lengths, max_rows, 0))
    generator = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 49152, (n,), generator=generator).tolist()

    items = [
        Encoded(ids(n), (ids(a), ids(b), ids(c)), 0)
        for n, a, b, c in [(3, 6, 2, 5), (7, 4, 6, 3), (1, 3, 3, 1), (5, 1, 1, 6), (2, 2, 4, 3)]
    ]
    prompt = torch.randn(4, 16, generator=generator)
    batch = softprompt.data.batch.score_batch(items, 0, tiny_backbone.tokenizer.pad_token_id)
    assert len(batch.then.groups) > 2  # the path under test: several continuation passes
    scores = score(tiny_backbone, prompt, items, batch_size=2)
    naive = eager_reference(model, lambda: naive_logprobs(model, prompt, items))
    torch.testing.assert_close(scores.logprobs[0], naive, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(ARCHITECTURES), indirect=["tiny_backbone"])
def test_choices_sharing_tokens_match_naive(tiny_backbone, attention, eager_reference):
    """Choices that share leading tokens with the row's choice read them off the row and continue
    after them (a choice that is a prefix of it, one equal to it, one sharing one or two tokens)."""
    model = use_attention(tiny_backbone.model, attention)
    items = [
        Encoded([11, 12, 13], ([21, 22, 23, 24], [21, 22, 30], [21, 31, 32, 33], [21, 22], [21, 22, 23, 24], [40, 41]), 0),
        Encoded([14], ([50, 51, 54], [50, 52, 53, 56], [50]), 2),
        Encoded([15, 16], ([60, 61, 62, 65], [60, 61, 63, 64]), 1),
    ]
    prompt = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    batch = softprompt.data.batch.score_batch(items, 0, tiny_backbone.tokenizer.pad_token_id)
    assert batch.then.contexts.tolist() == [4, 3, 2, 4]  # after the shared tokens
    scores = score(tiny_backbone, prompt, items, batch_size=3)
    naive = eager_reference(model, lambda: naive_logprobs(model, prompt, items))
    torch.testing.assert_close(scores.logprobs[0], naive, atol=1e-4, rtol=1e-5)
