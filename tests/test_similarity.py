"""Similarity measures on legible tensors, ON on tiny models against a naive forward, and the predictor ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ARCHITECTURES
from softprompt.analysis.similarity import (
    activated,
    average_token_cosine,
    neuron_overlap,
    per_token_cosine,
    rank_predictors,
    similarity_matrices,
)
from softprompt.analysis.ffn_probes import ffn_activation_rates, ffn_output_projections

E = torch.eye(3)


def test_per_token_and_average_token_cosine_on_one_hot_rows():
    a = torch.stack([E[0], E[1]])  # rows e0, e1
    b = torch.stack([E[0], E[0]])  # rows e0, e0
    prompts = torch.stack([a, b])
    # pairs (e0,e0) (e0,e0) (e1,e0) (e1,e0): cosines 1, 1, 0, 0
    assert per_token_cosine(prompts)[0, 1].item() == pytest.approx(0.5)
    # mean rows (0.5, 0.5, 0) and (1, 0, 0)
    assert average_token_cosine(prompts)[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert per_token_cosine(prompts)[1, 1].item() == pytest.approx(1.0)  # b's rows are all the same token


def test_neuron_overlap_counts_shared_neurons():
    active = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    on = neuron_overlap(active)
    assert on[0, 1].item() == pytest.approx(0.5)  # one shared of two each
    assert on[0, 2].item() == pytest.approx(1.0) and on[0, 0].item() == pytest.approx(1.0)
    assert on[0, 3].item() == 0.0  # a prompt that activates nothing overlaps nothing


def test_activated_needs_more_than_half_of_the_probe_tokens():
    rates = torch.tensor([[[0.2, 0.5, 0.51, 1.0]]])  # [N=1, L=1, I=4]
    assert activated(rates).tolist() == [[False, False, True, True]]


def naive_rates(model, prompt, input_ids, attention_mask) -> torch.Tensor:
    """Reference: one plain forward of [prompt; input] with inputs_embeds, hooks read the input positions."""
    batch = input_ids.shape[0]
    embeds = torch.cat([prompt.expand(batch, -1, -1), model.get_input_embeddings()(input_ids)], dim=1)  # [B, P+T, H]
    mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[0]), attention_mask], dim=1)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, prompt.shape[0]:])) for m in ffn_output_projections(model)]
    with torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = attention_mask.bool()
    return torch.stack([(s > 0)[real].float().mean(0) for s in seen])


@pytest.mark.parametrize("tiny_backbone", ARCHITECTURES, indirect=True, ids=ARCHITECTURES)
def test_ffn_activation_rates_equal_a_naive_forward(tiny_backbone):
    model = tiny_backbone.model
    torch.manual_seed(0)
    input_ids = torch.randint(10, 1000, (3, 7))
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    prompt = torch.randn(4, tiny_backbone.hidden_size)
    rates = ffn_activation_rates(model, prompt, input_ids, attention_mask)
    assert rates.shape[0] == len(ffn_output_projections(model)) == 2
    torch.testing.assert_close(rates, naive_rates(model, prompt, input_ids, attention_mask))
    other = ffn_activation_rates(model, torch.randn(4, tiny_backbone.hidden_size) * 3, input_ids, attention_mask)
    assert not torch.equal(rates, other)  # the prompt changes which neurons fire on the probe
    same = ffn_activation_rates(model, prompt.clone(), input_ids, attention_mask)
    on = neuron_overlap(activated(torch.stack([rates, same])))
    assert on[0, 1].item() == pytest.approx(1.0)


def naive_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_similarity_matrices_has_every_measure():
    torch.manual_seed(0)
    prompts = torch.randn(3, 2, 4)  # [N, P, H]
    # [N, L=2, I=3]: active (> 0.5) neurons A = {0, 1, 3}, B = {0, 4}, C = {} (0.5 itself is not more than half)
    rates = torch.tensor([[[0.9, 0.6, 0.1], [1.0, 0.5, 0.0]],
                          [[0.7, 0.2, 0.5], [0.3, 0.8, 0.4]],
                          [[0.5, 0.0, 0.2], [0.1, 0.5, 0.3]]])
    out = similarity_matrices(prompts, rates=rates)
    assert set(out) == {"frobenius", "cosine", "average_token_cosine", "per_token_cosine", "neuron_overlap"}
    assert all(m.shape == (3, 3) for m in out.values())
    for i, j in ((0, 1), (1, 2), (2, 0), (1, 1)):
        a, b = prompts[i], prompts[j]
        squares = [(x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())]
        assert out["frobenius"][i, j].item() == pytest.approx(math.sqrt(sum(squares)), abs=1e-6)
        assert out["cosine"][i, j].item() == pytest.approx(naive_cosine(a, b), abs=1e-6)
        assert out["average_token_cosine"][i, j].item() == pytest.approx(naive_cosine(a.mean(0), b.mean(0)), abs=1e-6)
        pairs = [naive_cosine(a[p], b[q]) for p in range(2) for q in range(2)]
        assert out["per_token_cosine"][i, j].item() == pytest.approx(sum(pairs) / 4, abs=1e-6)
    # ON = |A & B| / sqrt(|A| |B|): one shared neuron of 3 and 2; nothing shared with an empty set
    on = 1 / math.sqrt(6)
    torch.testing.assert_close(out["neuron_overlap"], torch.tensor([[1.0, on, 0.0], [on, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    without = similarity_matrices(prompts)
    assert "neuron_overlap" not in without and all(torch.equal(without[k], out[k]) for k in without)


def test_rank_predictors_orients_distances_and_ranks_the_best_first():
    rng = np.random.default_rng(0)
    distance = rng.uniform(1, 10, size=(4, 4))
    gain = -2 * distance  # closer prompts transfer better, exactly
    noise = rng.normal(size=(4, 4))
    rows = rank_predictors({"frobenius": distance.tolist(), "cosine": noise.tolist()}, {"zero-shot": gain.tolist()})
    assert [(r["measure"], r["rank"]) for r in rows] == [("frobenius", 1), ("cosine", 2)]
    assert rows[0]["spearman"] == pytest.approx(1.0) and rows[0]["spearman_p"] == pytest.approx(1 / 24)
