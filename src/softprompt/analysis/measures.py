"""Analyses of saved prompts and scores: norms, distances, maps, similarity, transfer, ensembling.

Pure functions on tensors. Conventions:
- Prompts of one analysis are stacked as `[N, P, H]`; distances are Frobenius norms `||A - B||_F`
  of the `[P, H]` matrices (the paper's similarity: lower = more similar), so every prompt compared
  must have the same shape.
- Accuracies are in percent.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits
from torch import Tensor


def stack_prompts(prompts: list[Tensor], names: list[str] | None = None) -> Tensor:
    """`[N, P, H]` from N prompts of equal shape.

    Raises:
        ValueError: shapes differ (names the prompts), or no prompts.
    """
    if not prompts:
        raise ValueError("no prompts to compare")
    names = names or [str(i) for i in range(len(prompts))]
    shapes = {tuple(p.shape) for p in prompts}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {list(p.shape)}" for n, p in zip(names, prompts))
        raise ValueError(
            f"prompts must have equal shape to be compared ({listing}); train them with the same --num-tokens and model"
        )
    return torch.stack([p.float() for p in prompts])


def frobenius_norms(prompts: Tensor) -> Tensor:
    """`||A||_F` of each prompt: `[N, P, H]` -> `[N]`."""
    return prompts.flatten(1).norm(dim=1)


def distance_matrix(prompts: Tensor) -> Tensor:
    """`||A_i - A_j||_F` for every pair: `[N, P, H]` -> `[N, N]`."""
    flat = prompts.flatten(1).double()
    return torch.cdist(flat, flat).float()


def cosine_matrix(prompts: Tensor) -> Tensor:
    """Cosine similarity of the flattened prompts: `[N, P, H]` -> `[N, N]`."""
    flat = torch.nn.functional.normalize(prompts.flatten(1).double(), dim=1)
    return (flat @ flat.T).float()


@dataclass(frozen=True)
class Spread:
    """How the prompts of one task spread over seeds (the paper's Table 1, made precise)."""

    n: int
    mean_norm: float  # mean of ||A_i||_F
    norm_variance: float  # sample variance (ddof=1) of the norms ||A_i||_F; 0 for one prompt
    centroid_msd: float  # mean squared distance to the task centroid: (1/n) sum_i ||A_i - mean(A)||_F^2
    mean_pairwise_distance: float  # mean ||A_i - A_j||_F over pairs i < j; nan for one prompt


def spread(prompts: Tensor) -> Spread:
    """Norm statistics of one task's prompts `[N, P, H]`.

    Which variance the paper's Table 1 reports is not stated; this gives the two natural readings:
    the variance of the norms, and the total variance around the mean prompt.
    """
    n = prompts.shape[0]
    norms = frobenius_norms(prompts).double()
    centroid = prompts.double().mean(0, keepdim=True)
    msd = float((prompts.double() - centroid).flatten(1).pow(2).sum(1).mean())
    upper = distance_matrix(prompts)[torch.triu_indices(n, n, offset=1).unbind()]
    return Spread(
        n=n,
        mean_norm=float(norms.mean()),
        norm_variance=float(norms.var(unbiased=True)) if n > 1 else 0.0,
        centroid_msd=msd,
        mean_pairwise_distance=float(upper.mean()) if n > 1 else math.nan,
    )


def group_distances(distances: Tensor, groups: list[str]) -> tuple[list[str], Tensor]:
    """Mean pairwise distance within each group (diagonal, pairs i < j) and between groups (off-diagonal).

    Args:
        distances: `[N, N]` from `distance_matrix`.
        groups: the group (task) of each prompt, length N.

    Returns:
        (group names in first-seen order, `[G, G]` means; nan where a group has one member).
    """
    names = list(dict.fromkeys(groups))
    label = torch.tensor([names.index(g) for g in groups])
    out = torch.full((len(names), len(names)), math.nan)
    for a in range(len(names)):
        for b in range(len(names)):
            pick = (label[:, None] == a) & (label[None, :] == b)
            if a == b:
                pick &= torch.ones_like(pick).triu(diagonal=1)
            if pick.any():
                out[a, b] = distances[pick].mean()
    return names, out


def perplexity_for(n: int) -> float:
    """A t-SNE perplexity valid for n points (scikit-learn needs perplexity < n): min(30, (n - 1) / 3), at least 1."""
    return float(max(1.0, min(30.0, (n - 1) / 3)))


def maps_2d(prompts: Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """2-D maps of flattened prompts: `{"tsne": [N, 2], "pca": [N, 2]}`.

    t-SNE keeps neighbourhoods but not distances, so PCA (a linear projection, distances shrunk but
    not warped) is given beside it.

    Raises:
        ValueError: fewer than 3 prompts (no 2-D map is meaningful).
    """
    n = prompts.shape[0]
    if n < 3:
        raise ValueError(f"a 2-D map needs at least 3 prompts, got {n}; train more seeds or tasks")
    flat = prompts.flatten(1).double().numpy()
    # A few dozen points: one thread is ~10x faster than OpenMP threads fighting over busy cores.
    with threadpool_limits(1):
        pca = PCA(n_components=2, random_state=seed).fit_transform(flat)
        tsne = TSNE(n_components=2, perplexity=perplexity_for(n), init="pca", random_state=seed).fit_transform(flat)
    return {"tsne": tsne, "pca": pca}


def transfer_gain(accuracy: Tensor, no_prompt: Tensor) -> Tensor:
    """Accuracy of source prompt s on target task t minus t's no-prompt accuracy.

    Args:
        accuracy: `[S, T]`, rows = prompt's task, columns = evaluated task.
        no_prompt: `[T]`.

    Returns:
        `[S, T]` (diagonal included: a prompt on its own task).
    """
    return accuracy - no_prompt[None, :]


@dataclass(frozen=True)
class Correlation:
    n_pairs: int
    spearman: float
    spearman_p: float
    pearson: float
    pearson_p: float


def similarity_vs_transfer(distance: Tensor, gain: Tensor) -> Correlation:
    """Spearman and Pearson correlation between `||A - B||_F` and transfer gain over off-diagonal pairs.

    A negative coefficient supports the paper's claim (closer prompts transfer better). With fewer
    than 3 pairs, or a constant input, the coefficients are nan.

    Args:
        distance, gain: `[T, T]` each, the same task order on both axes.
    """
    if distance.shape != gain.shape or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"distance {list(distance.shape)} and gain {list(gain.shape)} must be the same square shape")
    off = ~torch.eye(distance.shape[0], dtype=torch.bool)
    x, y = distance[off].double().numpy(), gain[off].double().numpy()
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(len(x), math.nan, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = stats.spearmanr(x, y)
        p = stats.pearsonr(x, y)
    return Correlation(len(x), float(s.statistic), float(s.pvalue), float(p.statistic), float(p.pvalue))


def majority_vote(logprobs: Tensor) -> Tensor:
    """Each prompt votes its argmax; ties go to the tied class with the highest mean log-probability.

    Args:
        logprobs: `[K, E, C]` (-inf for choices an example lacks).

    Returns:
        predictions `[E]`.
    """
    k, _, c = logprobs.shape
    votes = torch.nn.functional.one_hot(logprobs.argmax(-1), c).sum(0)  # [E, C]
    mean = mean_logprob(logprobs)
    tied = votes == votes.max(-1, keepdim=True).values
    return torch.where(tied, mean, torch.full_like(mean, float("-inf"))).argmax(-1)


def mean_logprob(logprobs: Tensor) -> Tensor:
    """Mean log-probability over the K prompts: `[K, E, C]` -> `[E, C]`."""
    return logprobs.mean(0)


@dataclass(frozen=True)
class EnsembleResult:
    """Lester et al.'s Table 3 layout: single prompts (mean, best) against their ensembles."""

    k: int
    single: tuple[float, ...]  # accuracy of each prompt
    mean: float
    sd: float  # sample sd over prompts (0 for one)
    best: float
    majority_vote: float
    mean_logprob: float


def ensemble(logprobs: Tensor, labels: Tensor) -> EnsembleResult:
    """Accuracy of each prompt and of the two ensembles, from `[K, E, C]` scores and `[E]` labels."""
    single = (logprobs.argmax(-1) == labels[None]).double().mean(1) * 100  # [K]
    accuracy = lambda predictions: 100.0 * float((predictions == labels).double().mean())  # noqa: E731
    return EnsembleResult(
        k=logprobs.shape[0],
        single=tuple(float(a) for a in single),
        mean=float(single.mean()),
        sd=float(single.std()) if len(single) > 1 else 0.0,
        best=float(single.max()),
        majority_vote=accuracy(majority_vote(logprobs)),
        mean_logprob=accuracy(mean_logprob(logprobs).argmax(-1)),
    )
