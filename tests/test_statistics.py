"""Bootstrap intervals and the Mantel permutation test, on hand-made inputs with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from softprompt.analysis.statistics import accuracy_interval, beats, mantel, mcnemar_exact, paired_comparison, wilson_interval

# 4 tasks, asymmetric, all off-diagonal values distinct: only the identity relabelling reproduces it.
X4 = np.array([[0, 3, 1, 7], [2, 0, 9, 4], [8, 5, 0, 6], [11, 10, 12, 0]], dtype=float)


def test_interval_of_a_constant_is_the_point():
    interval = accuracy_interval(np.ones(50, dtype=bool))
    assert (interval.estimate, interval.low, interval.high, interval.n) == (100.0, 100.0, 100.0, 50)


def test_interval_of_half_correct_matches_the_normal_approximation():
    correct = np.tile([True, False], 200)  # 400 examples, 50% correct: standard error 2.5 points
    interval = accuracy_interval(correct, seed=0)
    assert interval.estimate == 50.0
    assert interval.low == pytest.approx(50 - 1.96 * 2.5, abs=0.8)
    assert interval.high == pytest.approx(50 + 1.96 * 2.5, abs=0.8)
    assert accuracy_interval(correct, seed=0) == interval  # seeded: the report is reproducible


def test_interval_over_seeds_is_the_seeds_mean():
    # seed 0 scores 6/8 (75%), seed 1 scores 3/8 (37.5%): their mean is 56.25%, neither seed's score.
    correct = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 0, 1]], dtype=bool)
    interval = accuracy_interval(correct)
    assert interval.estimate == 56.25 and interval.n == 8  # n counts examples, not seeds x examples
    assert interval.low < 56.25 < interval.high


def test_seeds_that_disagree_on_every_example_have_a_point_interval():
    # seed 0 right on 3 of 4 (75%), seed 1 on the other one (25%): every example's seed mean is 0.5, so
    # resampling examples jointly for both seeds cannot move the mean; resampling seeds apart would.
    correct = np.array([np.tile([1, 1, 1, 0], 25), np.tile([0, 0, 0, 1], 25)], dtype=bool)
    interval = accuracy_interval(correct)
    assert (interval.estimate, interval.low, interval.high, interval.n) == (50.0, 50.0, 50.0, 100)


def test_interval_over_seeds_has_the_standard_error_of_the_per_example_means():
    # per-example seed means [1, .5, 0, 0] x 100: mean .375, sd sqrt(.3125 - .375**2) = .4146, so the
    # standard error over 400 examples is 2.07 points (800 pooled 0/1 outcomes would give 1.71).
    correct = np.array([np.tile([1, 1, 0, 0], 100), np.tile([1, 0, 0, 0], 100)], dtype=bool)
    interval = accuracy_interval(correct, seed=0)
    assert interval.estimate == 37.5 and interval.n == 400
    assert interval.low == pytest.approx(37.5 - 1.96 * 2.07, abs=0.5)
    assert interval.high == pytest.approx(37.5 + 1.96 * 2.07, abs=0.5)


def test_beats_needs_the_whole_interval_above():
    interval = accuracy_interval(np.tile([True, False], 200))
    assert beats(interval, 40.0) and not beats(interval, 48.0) and not beats(interval, 55.0)


def test_empty_eval_set_is_an_error():
    with pytest.raises(ValueError, match="at least one example"):
        accuracy_interval(np.zeros(0))


def test_wilson_interval_on_hand_worked_counts():
    # 3 of 10, z = 1.96: centre (0.3 + z^2/20) / (1 + z^2/10) = 0.3555, half-width z sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.2477
    interval = wilson_interval(3, 10)
    assert (interval.estimate, interval.n) == (30.0, 10)
    assert interval.low == pytest.approx(10.779, abs=1e-3) and interval.high == pytest.approx(60.322, abs=1e-3)
    # at the edges the interval stays inside [0, 100] and keeps width: all 4 rows on their anchor is not certainty
    assert wilson_interval(4, 4).high == 100.0 and wilson_interval(4, 4).low == pytest.approx(100 * 4 / (4 + 1.96**2), abs=1e-2)
    assert wilson_interval(0, 4).low == 0.0


@pytest.mark.parametrize(("successes", "n"), [(5, 4), (-1, 4), (0, 0)], ids=["above-n", "negative", "no-trials"])
def test_wilson_interval_refuses_impossible_counts(successes, n):
    with pytest.raises(ValueError, match=f"0 <= successes <= n and n >= 1, got {successes} of {n}"):
        wilson_interval(successes, n)


def test_mantel_perfect_correlation_has_the_smallest_p():
    result = mantel(X4, 2 * X4 + 1)
    assert result.spearman == pytest.approx(1.0) and result.pearson == pytest.approx(1.0)
    assert result.exact and result.permutations == 24 and result.n_pairs == 12
    assert result.spearman_p == pytest.approx(1 / 24) and result.pearson_p == pytest.approx(1 / 24)
    assert result.pearson_naive_p < 1e-6  # the naive p-value is far too confident for 4 tasks


def naive_mantel_p(x: np.ndarray, y: np.ndarray, correlation) -> float:
    """The textbook definition, written out: every relabelling of y's tasks, r over off-diagonal pairs."""
    off = ~np.eye(len(x), dtype=bool)
    observed = correlation(x[off], y[off]).statistic
    hits = [abs(correlation(x[off], y[np.ix_(p, p)][off]).statistic) >= abs(observed) - 1e-12
            for p in itertools.permutations(range(len(x)))]
    return float(np.mean(hits))


def test_mantel_equals_the_naive_enumeration():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 5))
    y = 0.5 * x + rng.normal(size=(5, 5))
    result = mantel(x, y)
    assert result.pearson_p == pytest.approx(naive_mantel_p(x, y, stats.pearsonr))
    assert result.spearman_p == pytest.approx(naive_mantel_p(x, y, stats.spearmanr))
    off = ~np.eye(5, dtype=bool)
    assert result.spearman == pytest.approx(stats.spearmanr(x[off], y[off]).statistic)
    assert result.pearson == pytest.approx(stats.pearsonr(x[off], y[off]).statistic)


def test_mantel_samples_permutations_for_many_tasks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 9))
    result = mantel(x, -x, permutations=499, seed=1)
    assert not result.exact and result.permutations == 500
    assert result.spearman == pytest.approx(-1.0) and result.spearman_p == pytest.approx(1 / 500)
    assert mantel(x, -x, permutations=499, seed=1) == result


def test_mantel_of_a_constant_matrix_is_nan():
    result = mantel(X4, np.ones((4, 4)))
    assert math.isnan(result.spearman) and math.isnan(result.spearman_p)


def test_mantel_shapes_must_match():
    with pytest.raises(ValueError, match=r"same square shape \[T, T\], got \[4, 4\] and \[3, 3\]"):
        mantel(X4, np.ones((3, 3)))


# --- paired: a trained prompt against no prompt on the same examples ------------------------------


def test_mcnemar_exact_on_hand_worked_counts():
    # b=8, c=1: P(X<=1) + P(X>=8) for X ~ Bin(9, 1/2) = 2 * (1 + 9) / 512
    assert mcnemar_exact(8, 1) == pytest.approx(0.0390625)
    assert mcnemar_exact(1, 8) == pytest.approx(0.0390625)  # two-sided: symmetric
    assert mcnemar_exact(3, 3) == 1.0  # as many wins as losses
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 2)


def test_paired_comparison_counts_discordant_pairs_and_the_difference():
    prompt = np.array([1] * 8 + [0] + [1, 1, 0, 0], dtype=bool)  # 8 only-prompt, 1 only-baseline, 2 both, 2 neither
    baseline = np.array([0] * 8 + [1] + [1, 1, 0, 0], dtype=bool)
    result = paired_comparison(prompt, baseline, seed=0)
    assert (result.n, result.prompt_only, result.baseline_only) == (13, 8, 1)
    assert result.mcnemar_p == pytest.approx(0.0390625)
    assert result.difference == pytest.approx(100 * 7 / 13)
    assert result.low < result.difference < result.high
    assert paired_comparison(prompt, baseline, seed=0) == result  # seeded


def test_paired_bootstrap_matches_the_normal_approximation():
    # 80 examples +1, 40 examples -1, 280 ties: difference 10 points; var(d) = 0.3 - 0.1^2, se = sqrt(0.29 / 400) = 2.69 points
    prompt = np.array([1] * 80 + [0] * 40 + [1] * 140 + [0] * 140, dtype=bool)
    baseline = np.array([0] * 80 + [1] * 40 + [1] * 140 + [0] * 140, dtype=bool)
    result = paired_comparison(prompt, baseline, seed=1)
    se = 100 * math.sqrt(0.29 / 400)
    assert result.difference == pytest.approx(10.0)
    assert result.low == pytest.approx(10 - 1.96 * se, abs=0.8) and result.high == pytest.approx(10 + 1.96 * se, abs=0.8)


def test_identical_predictions_have_p_one_and_a_point_interval():
    correct = np.array([1, 0, 1, 1, 0], dtype=bool)
    result = paired_comparison(correct, correct)
    assert (result.prompt_only, result.baseline_only, result.mcnemar_p) == (0, 0, 1.0)
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0)


def test_paired_comparison_of_seeds_uses_their_mean_and_majority():
    # two seeds on 4 examples; the baseline gets none right. Per example mean: 1, 0.5, 0.5, 0
    seeds = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    result = paired_comparison(seeds, np.zeros(4, dtype=bool))
    assert result.difference == pytest.approx(50.0)  # the seeds' mean accuracy minus 0
    assert (result.prompt_only, result.baseline_only) == (1, 0)  # only example 0 is right on more than half the seeds


def test_paired_comparison_refuses_different_examples():
    with pytest.raises(ValueError, match="same non-empty examples, got 3 and 2"):
        paired_comparison(np.ones(3), np.ones(2))
