"""The model's own head: logits at the scored positions equal the model's own full forward, for every family.

One test over architectures whose heads differ (tied, untied, soft-capped, scaled up, scaled down):
a family whose post-head step softprompt skipped would fail here. Run in every attention implementation
that `--attention auto` can pick, against the model's own forward in eager attention.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, use_attention, with_attention
from naive import full_logits
from factories import model_from_config
from softprompt.core.forward import logits_at

_SMALL = dict(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
HEAD_CONFIGS = {
    **TINY_CONFIGS,  # llama (tied), bloom, gpt2, gemma (final_logit_softcapping)
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, **_SMALL),
    "granite": dict(model_type="granite", logits_scaling=4.0, **_SMALL),  # logits / 4
    "cohere": dict(model_type="cohere", logit_scale=0.25, **_SMALL),  # logits * 0.25
}


@pytest.mark.parametrize("arch, attention", with_attention(HEAD_CONFIGS, HEAD_CONFIGS))
def test_logits_equal_the_models_own_forward(tokenizer, arch, attention, eager_reference):
    model = use_attention(model_from_config(HEAD_CONFIGS[arch], tokenizer, seed=0).model, attention)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(3, 16, generator=generator)
    input_ids = torch.randint(5, 49152, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    rows, positions = torch.tensor([1, 0, 0, 1, 0]), torch.tensor([3, 6, 0, 3, 2])  # any order, repeats
    with torch.no_grad():
        got = logits_at(model, prompt, input_ids, mask, rows, positions)
        want = eager_reference(model, lambda: full_logits(model, prompt, input_ids, mask)[rows, positions + 3])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
