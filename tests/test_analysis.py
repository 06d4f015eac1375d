"""Analyses on hand-made tensors with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.analysis.measures import (
    cosine_matrix,
    distance_matrix,
    ensemble,
    frobenius_norms,
    group_distances,
    majority_vote,
    maps_2d,
    perplexity_for,
    similarity_vs_transfer,
    spread,
    stack_prompts,
    transfer_gain,
)


def test_frobenius_norms_and_distances():
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||a||_F = 5
    b = torch.zeros(2, 2)
    c = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    prompts = stack_prompts([a, b, c])
    assert frobenius_norms(prompts).tolist() == pytest.approx([5.0, 0.0, 3.0])
    assert torch.allclose(distance_matrix(prompts), torch.tensor([[0.0, 5, 4], [5, 0, 3], [4, 3, 0]]))


def test_cosine_matrix_of_flattened_prompts():
    prompts = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])
    assert cosine_matrix(prompts)[0].tolist() == pytest.approx([1.0, 1.0, 0.0, -1.0])


def test_prompts_of_different_shape_are_refused():
    with pytest.raises(ValueError, match=r"equal shape.*cb: \[20, 4\], rte: \[14, 4\]"):
        stack_prompts([torch.zeros(20, 4), torch.zeros(14, 4)], ["cb", "rte"])
    with pytest.raises(ValueError, match="no prompts"):
        stack_prompts([])


def test_spread_by_hand():
    # two 1x1 prompts, 1 and 3: norms 1 and 3, mean 2, sample variance 2; centroid 2, squared distances 1 and 1
    prompts = torch.tensor([[[1.0]], [[3.0]]])
    s = spread(prompts)
    assert (s.n, s.mean_norm, s.norm_variance, s.centroid_msd, s.mean_pairwise_distance) == pytest.approx((2, 2.0, 2.0, 1.0, 2.0))


def test_spread_separates_the_two_variances():
    # same norm, opposite directions: the variance of the norms is 0, the spread around the centroid is not
    s = spread(torch.tensor([[[5.0, 0.0]], [[-5.0, 0.0]], [[0.0, 5.0]]]))
    assert s.norm_variance == pytest.approx(0.0)
    centroid = torch.tensor([0.0, 5 / 3])
    expected = sum(float((torch.tensor(p) - centroid).pow(2).sum()) for p in ([5.0, 0.0], [-5.0, 0.0], [0.0, 5.0])) / 3
    assert s.centroid_msd == pytest.approx(expected)


def test_spread_of_one_prompt():
    s = spread(torch.ones(1, 2, 2))
    assert s.norm_variance == 0.0 and s.centroid_msd == 0.0 and math.isnan(s.mean_pairwise_distance)


def test_group_distances_within_and_between():
    # 1-D points: task a at 0 and 2, task b at 10
    prompts = torch.tensor([[[0.0]], [[2.0]], [[10.0]]])
    names, matrix = group_distances(distance_matrix(prompts), ["a", "a", "b"])
    assert names == ["a", "b"]
    assert matrix[0, 0].item() == pytest.approx(2.0)  # within a: one pair
    assert matrix[0, 1].item() == pytest.approx(9.0) and matrix[1, 0].item() == pytest.approx(9.0)  # (10 + 8) / 2
    assert math.isnan(matrix[1, 1].item())  # one prompt: no pair


@pytest.mark.parametrize(("n", "expected"), [(3, 1.0), (8, 7 / 3), (16, 5.0), (200, 30.0)], ids=["3", "8", "16", "200"])
def test_perplexity_is_valid_for_n(n, expected):
    assert perplexity_for(n) == pytest.approx(expected)
    assert perplexity_for(n) < n


def test_maps_2d_shapes_and_pca_separates_clusters():
    generator = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.randn(4, 3, 5, generator=generator) * 0.01, torch.randn(4, 3, 5, generator=generator) * 0.01 + 5])
    maps = maps_2d(prompts)
    assert maps["tsne"].shape == (8, 2) and maps["pca"].shape == (8, 2)
    first = maps["pca"][:, 0]
    assert (first[:4] < first[4:].min()).all() or (first[:4] > first[4:].max()).all()
    with pytest.raises(ValueError, match="at least 3 prompts, got 2"):
        maps_2d(prompts[:2])


def test_transfer_gain_subtracts_the_column_baseline():
    accuracy = torch.tensor([[60.0, 50.0], [40.0, 70.0]])
    gain = transfer_gain(accuracy, torch.tensor([45.0, 55.0]))
    assert gain.tolist() == [[15.0, -5.0], [-5.0, 15.0]]


def test_similarity_vs_transfer_uses_off_diagonal_pairs():
    distance = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    # off-diagonal gains fall exactly linearly with distance; the diagonal (huge) must be ignored
    gain = 10 - 2 * distance + 100 * torch.eye(3)
    c = similarity_vs_transfer(distance, gain)
    assert c.n_pairs == 6
    assert c.spearman == pytest.approx(-1.0) and c.pearson == pytest.approx(-1.0)
    assert c.pearson_p < 1e-3


def test_similarity_vs_transfer_undefined_cases():
    two = similarity_vs_transfer(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[5.0, 2.0], [3.0, 5.0]]))
    assert two.n_pairs == 2 and math.isnan(two.spearman)
    with pytest.raises(ValueError, match="same square shape"):
        similarity_vs_transfer(torch.zeros(2, 2), torch.zeros(3, 3))


def test_majority_vote_with_tie_broken_by_mean_logprob():
    # 2 prompts, 1 example, 3 classes: prompt 0 votes class 0, prompt 1 votes class 2: a tie;
    # mean log-probs: class 0 = -1.5, class 2 = -0.95, so class 2 wins
    logprobs = torch.tensor([[[-0.1, -5.0, -1.0]], [[-2.9, -5.0, -0.9]]])
    assert majority_vote(logprobs).tolist() == [2]


def test_majority_vote_majority_wins_over_mean():
    # 3 prompts vote 0, 0, 1, but prompt 2 is so sure of 1 that the mean favours 1
    logprobs = torch.tensor([[[-0.6, -0.8]], [[-0.6, -0.8]], [[-20.0, -0.01]]])
    assert majority_vote(logprobs).tolist() == [0]
    assert ensemble(logprobs, torch.tensor([0])).mean_logprob == 0.0


def test_ensemble_table3_numbers():
    labels = torch.tensor([0, 1, 1, 0])
    # rows: prompt; each example: (logprob class 0, logprob class 1)
    logprobs = torch.tensor(
        [
            [[-0.1, -2.0], [-0.1, -2.0], [-2.0, -0.1], [-0.1, -2.0]],  # right on 0, 2, 3 -> 75
            [[-0.1, -2.0], [-2.0, -0.1], [-0.1, -2.0], [-0.1, -2.0]],  # right on 0, 1, 3 -> 75
            [[-2.0, -0.1], [-2.0, -0.1], [-2.0, -0.1], [-0.1, -2.0]],  # right on 1, 2, 3 -> 75
        ]
    )
    result = ensemble(logprobs, labels)
    assert result.k == 3 and result.single == (75.0, 75.0, 75.0)
    assert (result.mean, result.best, result.sd) == (75.0, 75.0, 0.0)
    assert result.majority_vote == 100.0  # each example has a 2-1 majority for the right class
    assert result.mean_logprob == 100.0


def test_ensemble_ignores_missing_choices():
    # example 1 has two choices only (-inf for the third, which must never win)
    logprobs = torch.tensor([[[-1.0, -2.0, -0.5], [-1.0, -0.5, -math.inf]], [[-1.0, -2.0, -0.4], [-0.2, -0.9, -math.inf]]])
    result = ensemble(logprobs, torch.tensor([2, 1]))
    assert result.single == (100.0, 50.0)
    # example 1: mean log-probs (-0.6, -0.7, -inf) -> class 0, wrong; its vote is a 1-1 tie broken the same way
    assert result.mean_logprob == 50.0 and result.majority_vote == 50.0
