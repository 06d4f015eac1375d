"""Honest statistics: bootstrap and Wilson intervals for accuracies, paired tests (McNemar, paired bootstrap), and a Mantel test for matrix-vs-matrix correlation.

Conventions: accuracies are in percent; an "interval" is a 95% percentile bootstrap over val
examples (scipy's `stats.bootstrap`), seeded so a report is reproducible. Matrices are `[T, T]`
over the same task order; only off-diagonal entries are compared (a prompt on its own task is not
a transfer).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
EXACT_UP_TO = 8  # tasks: 8! = 40,320 permutations are enumerated; more are sampled
PERMUTATIONS = 9999  # sampled permutations beyond EXACT_UP_TO tasks


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval, in percent."""

    estimate: float
    low: float
    high: float
    n: int  # examples resampled
    confidence: float = CONFIDENCE


def accuracy_interval(correct: np.ndarray, seed: int = 0, confidence: float = CONFIDENCE,
                      n_resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """Mean accuracy and its percentile-bootstrap interval over examples.

    Args:
        correct: `[E]` per-example correctness (bool or 0/1), or `[K, E]` for K prompts (seeds):
            then the statistic is the mean over prompts, and examples are resampled jointly for
            all K, so the interval is that of the seeds' mean accuracy on this val set.
        seed: seeds the resampling.

    Raises:
        ValueError: no examples.
    """
    values = np.asarray(correct, dtype=float)
    per_example = values.mean(0) if values.ndim == 2 else values  # [E]: mean over seeds, per example
    if per_example.size == 0:
        raise ValueError("accuracy_interval needs at least one example; the eval set is empty")
    estimate = 100.0 * float(per_example.mean())
    if np.ptp(per_example) == 0:  # every resample has the same mean: the interval is the point
        return Interval(estimate, estimate, estimate, per_example.size, confidence)
    result = stats.bootstrap((per_example,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return Interval(estimate, 100.0 * float(ci.low), 100.0 * float(ci.high), per_example.size, confidence)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """A share `successes / n` and its Wilson score interval, in percent: for a count with no per-example data
    (a run.json's val accuracy and n, a prompt's rows on their anchor token out of P).

    Raises:
        ValueError: n < 1, or `successes` outside 0..n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(100.0 * successes / n, 100.0 * float(ci.low), 100.0 * float(ci.high), n, confidence)


def beats(interval: Interval, baseline: float) -> bool:
    """True only when the whole interval lies above `baseline` (percent)."""
    return interval.low > baseline


@dataclass(frozen=True)
class MatrixCorrelation:
    """Correlation of two `[T, T]` matrices over off-diagonal pairs, with Mantel permutation p-values."""

    n_tasks: int
    n_pairs: int
    spearman: float
    pearson: float
    spearman_p: float  # Mantel: share of joint task relabellings with |r| at least the observed |r|
    pearson_p: float
    permutations: int  # relabellings compared (the identity included)
    exact: bool  # every relabelling enumerated (else a seeded random sample)
    spearman_naive_p: float  # scipy's p-value, which wrongly treats pairs as independent (for comparison)
    pearson_naive_p: float


def _off_diagonal(matrix: np.ndarray) -> np.ndarray:
    return matrix[~np.eye(matrix.shape[0], dtype=bool)]


def _relabellings(t: int, permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """`[R, T]` task orders: all T! when T <= EXACT_UP_TO, else the identity plus `permutations` random ones."""
    if t <= EXACT_UP_TO:
        return np.array(list(itertools.permutations(range(t)))), True
    rng = np.random.default_rng(seed)
    return np.vstack([np.arange(t), np.array([rng.permutation(t) for _ in range(permutations)])]), False


def _correlations(x: np.ndarray, y_perm: np.ndarray) -> np.ndarray:
    """Pearson r of `x` `[N]` with each row of `y_perm` `[R, N]`: `[R]`."""
    xc = x - x.mean()
    yc = y_perm - y_perm.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc @ xc) / np.sqrt((yc**2).sum(1) * (xc**2).sum())


def mantel(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> MatrixCorrelation:
    """Spearman and Pearson correlation of two task-by-task matrices, with Mantel-style p-values.

    Pairs of tasks share tasks, so they are not independent observations: the null distribution is
    built by relabelling the tasks of `y` jointly (rows and columns by the same permutation) and
    recomputing the correlation over off-diagonal entries. Two-sided: p = share of relabellings
    (the identity included) whose |r| >= the observed |r|. The smallest possible p is 1 / T!.

    Args:
        x, y: `[T, T]`, same task order (e.g. a prompt distance and a transfer gain matrix).
        permutations: random relabellings drawn when T > EXACT_UP_TO.

    Raises:
        ValueError: shapes differ or are not square.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"matrices must be the same square shape [T, T], got {list(x.shape)} and {list(y.shape)}")
    t = x.shape[0]
    xo, yo = _off_diagonal(x), _off_diagonal(y)
    nan = MatrixCorrelation(t, xo.size, math.nan, math.nan, math.nan, math.nan, 0, False, math.nan, math.nan)
    if xo.size < 3 or not (np.isfinite(xo).all() and np.isfinite(yo).all()) or np.ptp(xo) == 0 or np.ptp(yo) == 0:
        return nan
    orders, exact = _relabellings(t, permutations, seed)
    y_perm = np.stack([_off_diagonal(y[np.ix_(o, o)]) for o in orders])  # [R, N]
    # Ranks of a relabelled matrix's entries are the relabelled ranks: rank once, permute the ranks.
    ranks = _rank_matrix(y)
    rank_perm = np.stack([_off_diagonal(ranks[np.ix_(o, o)]) for o in orders])
    pearson = _correlations(xo, y_perm)
    spearman = _correlations(stats.rankdata(xo), rank_perm)
    tolerance = 1e-12  # ties in |r| (symmetric matrices) count as "at least as extreme"
    p_of = lambda r: float((np.abs(r) >= abs(r[0]) - tolerance).mean())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive_s, naive_p = stats.spearmanr(xo, yo).pvalue, stats.pearsonr(xo, yo).pvalue
    return MatrixCorrelation(t, xo.size, float(spearman[0]), float(pearson[0]), p_of(spearman), p_of(pearson),
                             len(orders), exact, float(naive_s), float(naive_p))


def _rank_matrix(y: np.ndarray) -> np.ndarray:
    """`y` with its off-diagonal entries replaced by their ranks (average ranks for ties)."""
    out = np.zeros_like(y)
    off = ~np.eye(y.shape[0], dtype=bool)
    out[off] = stats.rankdata(y[off])
    return out


@dataclass(frozen=True)
class PairedComparison:
    """A prompt against a baseline scored on the same examples: McNemar's exact test and a paired bootstrap.

    `prompt_only` (b) counts examples only the prompt gets right, `baseline_only` (c) those only the
    baseline gets right; the difference is in accuracy points (prompt minus baseline).
    """

    n: int
    prompt_only: int
    baseline_only: int
    mcnemar_p: float  # two-sided exact: binomial(b; b + c, 1/2); 1.0 when no example is discordant
    difference: float
    low: float
    high: float
    confidence: float = CONFIDENCE


def mcnemar_exact(prompt_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: under the null each discordant pair is a fair coin.

    Raises:
        ValueError: a negative count.
    """
    if prompt_only < 0 or baseline_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={prompt_only}, c={baseline_only}")
    discordant = prompt_only + baseline_only
    if discordant == 0:  # the two agree on every example: no evidence either way
        return 1.0
    return float(min(1.0, stats.binomtest(prompt_only, discordant, 0.5, alternative="two-sided").pvalue))


def paired_comparison(prompt_correct: np.ndarray, baseline_correct: np.ndarray, seed: int = 0,
                      confidence: float = CONFIDENCE, n_resamples: int = BOOTSTRAP_RESAMPLES) -> PairedComparison:
    """McNemar's exact test and a seeded paired bootstrap of the accuracy difference, prompt minus baseline.

    Args:
        prompt_correct: `[E]` per-example correctness of the prompt, or `[K, E]` for K prompts (seeds): then
            the prompt's per-example score is the mean over prompts (the discordant counts use a majority:
            right on more than half of the prompts).
        baseline_correct: `[E]` per-example correctness of the baseline (no prompt) on the same examples.
        seed: seeds the resampling (examples are resampled jointly, keeping each pair together).

    Raises:
        ValueError: no examples, or the two cover different numbers of examples.
    """
    prompt = np.asarray(prompt_correct, dtype=float)
    prompt = prompt.mean(0) if prompt.ndim == 2 else prompt  # [E]
    baseline = np.asarray(baseline_correct, dtype=float)
    if prompt.shape != baseline.shape or prompt.size == 0:
        raise ValueError(f"paired comparison needs the same non-empty examples, got {prompt.size} and {baseline.size}")
    right, base_right = prompt > 0.5, baseline > 0.5
    b, c = int((right & ~base_right).sum()), int((~right & base_right).sum())
    diff = 100.0 * (prompt - baseline)  # [E] per-example difference: its mean is the accuracy difference
    estimate = float(diff.mean())
    if np.ptp(diff) == 0:
        low = high = estimate
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return PairedComparison(prompt.size, b, c, mcnemar_exact(b, c), estimate, low, high, confidence)
