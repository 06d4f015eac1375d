"""Similarity measures between tasks' prompts, and how well each predicts transfer.

Embedding measures on stacked prompts `[N, P, H]`:
- `frobenius`: the paper's `||A - B||_F` (a distance: lower = more similar);
- `cosine`: cosine of the flattened prompts;
- `average_token_cosine`: cosine of the mean prompt tokens (SPoT's "cosine similarity of average tokens");
- `per_token_cosine`: mean cosine over every pair of rows `(A_i, B_j)` (SPoT's "per-token average
  cosine similarity", Vu et al. 2022, written from the paper's description; no reference code here).
A model-based measure, `neuron_overlap` (Su et al. 2022's "ON"): a prompt activates an FFN neuron
when that neuron is active (> 0) on more than half of a fixed probe set's input tokens; ON is the
cosine of two prompts' binary activation vectors, `|A & B| / sqrt(|A| |B|)` (1 for identical prompts).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from torch import Tensor

from softprompt.analysis import measures
from softprompt.analysis.statistics import mantel

ACTIVE_SHARE = 0.5  # a prompt activates a neuron when it fires on more than this share of probe tokens
# measure -> True when a higher value means more similar (Frobenius is a distance)
HIGHER_IS_SIMILAR = {"frobenius": False, "cosine": True, "average_token_cosine": True, "per_token_cosine": True,
                     "neuron_overlap": True}


def average_token_cosine(prompts: Tensor) -> Tensor:
    """Cosine of the prompts' mean rows: `[N, P, H]` -> `[N, N]`."""
    mean = torch.nn.functional.normalize(prompts.double().mean(1), dim=-1)  # [N, H]
    return (mean @ mean.T).float()


def per_token_cosine(prompts: Tensor) -> Tensor:
    """Mean of `cos(A_i, B_j)` over all row pairs (i, j): `[N, P, H]` -> `[N, N]`."""
    rows = torch.nn.functional.normalize(prompts.double(), dim=-1)  # [N, P, H]
    return torch.einsum("aph,bqh->ab", rows, rows).div(prompts.shape[1] ** 2).float()


def activated(rates: Tensor, share: float = ACTIVE_SHARE) -> Tensor:
    """Binary activation vectors from `ffn_activation_rates` of N prompts: `[N, L, I]` -> `[N, L*I]` bool."""
    return (rates > share).flatten(1)


def neuron_overlap(active: Tensor) -> Tensor:
    """ON: `|A & B| / sqrt(|A| |B|)` for every pair of binary vectors `[N, D]` -> `[N, N]` (0 where one is empty)."""
    a = active.double()
    both = a @ a.T
    sizes = a.sum(1)
    norm = (sizes[:, None] * sizes[None, :]).sqrt()
    return torch.where(norm > 0, both / norm.clamp_min(1e-12), torch.zeros_like(both)).float()


def similarity_matrices(prompts: Tensor, rates: Tensor | None = None) -> dict[str, Tensor]:
    """Every measure's `[N, N]` matrix; `neuron_overlap` only when FFN activation rates `[N, L, I]` are given."""
    out = {
        "frobenius": measures.distance_matrix(prompts),
        "cosine": measures.cosine_matrix(prompts),
        "average_token_cosine": average_token_cosine(prompts),
        "per_token_cosine": per_token_cosine(prompts),
    }
    if rates is not None:
        out["neuron_overlap"] = neuron_overlap(activated(rates))
    return out


def rank_predictors(matrices: dict[str, list[list[float]]], transfer: dict[str, list[list[float]]], seed: int = 0) -> list[dict]:
    """How well each similarity measure predicts each kind of transfer, best first within each transfer.

    Each measure is oriented so that higher = more similar (a distance is negated), so a positive
    coefficient means "more similar prompts transfer better". Rows are ordered by that oriented
    Spearman coefficient (nan last), with Mantel permutation p-values beside the naive ones.

    Args:
        matrices: measure name -> `[T, T]` (the names of `HIGHER_IS_SIMILAR`).
        transfer: transfer kind (e.g. "zero-shot gain", "SPoT gain") -> `[T, T]` (rows: source prompt).
    """
    rows = []
    for kind, gain in transfer.items():
        ranked = []
        for name, matrix in matrices.items():
            sign = 1.0 if HIGHER_IS_SIMILAR[name] else -1.0
            result = mantel(sign * np.asarray(matrix, dtype=float), np.asarray(gain, dtype=float), seed=seed)
            ranked.append({"transfer": kind, "measure": name, **asdict(result)})
        ranked.sort(key=lambda r: -r["spearman"] if np.isfinite(r["spearman"]) else np.inf)
        rows += [{**r, "rank": i + 1} for i, r in enumerate(ranked)]
    return rows
