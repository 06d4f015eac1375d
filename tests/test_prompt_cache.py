"""logits_at runs a shared prompt once and reuses its keys/values: same logits and gradients as `[prompt; input]`."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES
from softprompt.prompt import logits_at, output_logits, prepend


def _concatenated(model, prompt, input_ids, attention_mask, rows, positions):
    """The textbook forward: one pass over `[prompt; input]` for every row."""
    embeds, mask = prepend(prompt, model.get_input_embeddings()(input_ids), attention_mask)
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return output_logits(model, hidden[rows, positions + prompt.shape[-2]])


@pytest.mark.parametrize("tiny_backbone", ARCHITECTURES, indirect=True)
@pytest.mark.parametrize("num_tokens", [5, 70], ids=["short", "past-sliding-window"])
def test_cached_prompt_matches_concatenation(tiny_backbone, num_tokens):
    torch.manual_seed(0)
    model = tiny_backbone.model
    input_ids = torch.randint(0, 49152, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0  # right padding
    rows, positions = torch.tensor([0, 1, 2, 0]), torch.tensor([11, 6, 2, 5])
    ours = torch.nn.Parameter(torch.randn(num_tokens, 16))
    reference = torch.nn.Parameter(ours.detach().clone())

    cached = logits_at(model, ours, input_ids, mask, rows, positions)
    plain = _concatenated(model, reference, input_ids, mask, rows, positions)
    cached.logsumexp(-1).sum().backward()
    plain.logsumexp(-1).sum().backward()

    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.grad, reference.grad, atol=1e-6, rtol=1e-4)
    assert reference.grad.abs().max() > 0
