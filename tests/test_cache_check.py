"""The forward cannot lose the prompt silently: a cache without the prompt's positions is an error."""

from __future__ import annotations

import pytest
import torch

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
    ids = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        logits_at(tiny_backbone.model, torch.randn(3, 16), ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([3]))
