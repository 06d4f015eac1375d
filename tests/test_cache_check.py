"""The forward cannot lose the prompt silently: a cache without the prompt's positions is an error."""

from __future__ import annotations

import pytest
import torch

from conftest import REFERENCE_ATTENTION, attention_as
from naive import full_logits
from softprompt.core.forward import logits_at


class IgnoresTheCache(torch.nn.Module):
    """A real model whose forward drops the `cache` keyword, as a transformers release that renamed it
    would (its forward takes **kwargs): the rows would then run without the prompt's keys/values."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, cache=None, **kwargs):
        return self.model(**kwargs)


def test_a_dropped_prompt_cache_is_an_error(tiny_backbone):
    model = IgnoresTheCache(tiny_backbone.model)
    ids = torch.tensor([[11, 12, 13, 14]])
    with pytest.raises(RuntimeError, match=r"returned a cache of 4 positions, expected 7 \(prompt \+ input\): the prompt's keys/values were not used"):
        logits_at(model, torch.randn(3, 16), ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([3]))


def test_the_real_model_keeps_it(tiny_backbone):
    """No error, and the prompt's keys/values were used: the logits are the naive `[prompt; input]` forward's."""
    model, ids = tiny_backbone.model, torch.tensor([[11, 12, 13, 14]])
    prompt = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = logits_at(model, prompt, ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([3]))  # [1, V]
        with attention_as(model, REFERENCE_ATTENTION):
            naive = full_logits(model, prompt, ids, torch.ones_like(ids))[0, 3 + 3]  # [V]: input position 3 after 3 prompt rows
            unprompted = full_logits(model, None, ids, torch.ones_like(ids))[0, 3]
    torch.testing.assert_close(got[0], naive, atol=1e-5, rtol=1e-5)
    assert (naive - unprompted).abs().max() > 1e-2  # without the prompt the answer would differ
