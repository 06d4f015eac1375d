"""Which prompt rows matter, causally: ablate one row at a time and score again.

Each row of a trained `[P, H]` prompt is replaced by (a) its init embedding (the row undoes its
training) or (b) the vocabulary's mean embedding (the row says nothing in particular), and the val
set is scored again. A row's importance is what the trained prompt loses: accuracy (points) and the
mean log-likelihood of the gold choice (nats). All ablated prompts have P rows, so one `score` call
scores them together, each on top of its own keys/values.

The paper's claim that rows which kept their init token "must really help" is then tested by
`persisted_vs_drifted`: a permutation test that shuffles the persisted labels among the rows of
each prompt (a prompt's rows share its task, seed and val set; rows of different prompts do not).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import reduce

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from softprompt.backbones.loading import Backbone
from softprompt.core.prompt import embed_ids
from softprompt.data.batch import Encoded
from softprompt.eval.scoring import Scores, score

EXACT_LIMIT = 100_000  # within-prompt relabellings enumerated up to this many; beyond, sampled
PERMUTATIONS = 9999  # sampled relabellings (the observed one is added)


class Replacement(str, Enum):
    INIT = "init"  # the row's init embedding
    MEAN = "mean"  # the mean embedding of the whole vocabulary


@dataclass(frozen=True)
class RowImportance:
    position: int
    replacement: Replacement
    accuracy_drop: float  # trained accuracy - ablated accuracy, points (positive: the row helps)
    loglik_drop: float  # trained - ablated mean gold-choice log-likelihood, nats


@dataclass(frozen=True)
class RowAblation:
    accuracy: float  # the trained prompt's, percent
    loglik: float  # the trained prompt's mean gold-choice log-likelihood
    rows: tuple[RowImportance, ...]  # by replacement, then position


@torch.no_grad()
def vocab_mean_embedding(model: PreTrainedModel, chunk_size: int = 16384) -> Tensor:
    """The mean of every vocabulary embedding as the model sees it (Gemma's scaling included): `[H]` fp32 CPU."""
    embedding = model.get_input_embeddings()
    total = torch.zeros(embedding.embedding_dim, dtype=torch.float64)
    for start in range(0, embedding.num_embeddings, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, embedding.num_embeddings), device=embedding.weight.device)
        total += embedding(ids).double().sum(0).cpu()
    return (total / embedding.num_embeddings).float()


def init_embeddings(model: PreTrainedModel, init_ids: list[int] | None) -> Tensor | None:
    """The init replacement `[P, H]`: each row's init token embedded (run.json's `init_ids`, see
    `interpret.run_init_ids`), or None for an init with no tokens (random)."""
    return None if init_ids is None else embed_ids(model, init_ids)


def ablated_prompts(prompt: Tensor, replacement: Tensor) -> Tensor:
    """P copies of `prompt` `[P, H]`, copy k with row k replaced by `replacement[k]`: `[P, P, H]`.

    Args:
        replacement: `[P, H]` (per row) or `[H]` (the same vector for every row).
    """
    replacement = replacement.expand_as(prompt).to(prompt)
    ablated = prompt.unsqueeze(0).repeat(prompt.shape[0], 1, 1)  # [P, P, H]
    index = torch.arange(prompt.shape[0])
    ablated[index, index] = replacement
    return ablated


def gold_loglik(scores: Scores) -> Tensor:
    """Mean over examples of the gold choice's summed log-likelihood, per prompt: `[K]`."""
    labels = scores.labels.expand(scores.logprobs.shape[0], -1).unsqueeze(-1)  # [K, E, 1]
    return scores.logprobs.gather(-1, labels).squeeze(-1).mean(-1)


def accuracies(scores: Scores) -> Tensor:
    """Rank-classification accuracy per prompt, percent: `[K]`."""
    return 100.0 * (scores.predictions() == scores.labels).float().mean(-1)


def row_importance(
    backbone: Backbone, prompt: Tensor, items: list[Encoded], init: Tensor | None, batch_size: int = 16
) -> RowAblation:
    """Each row's importance: what the prompt loses when that row alone is replaced.

    One `score` call scores the trained prompt and its ablations (1 + 2P prompts, 1 + P without an
    init), each on top of its own keys/values, so the val set is batched and encoded once.

    Args:
        prompt: `[P, H]` trained prompt.
        items: the encoded val examples of the prompt's task.
        init: `[P, H]` the prompt's init (run.json's `init_ids` embedded), or None for a random init:
            then only the vocabulary-mean replacement is made.

    Raises:
        ValueError: no examples, or an init of another shape.
    """
    if not items:
        raise ValueError("row importance needs the prompt's task and its val examples; give --task (none were encoded)")
    replacements = {Replacement.MEAN: vocab_mean_embedding(backbone.model)}
    if init is not None:
        if init.shape != prompt.shape:
            raise ValueError(f"init has shape {list(init.shape)} but the prompt is {list(prompt.shape)}; embed the run's own init ids")
        replacements = {Replacement.INIT: init, **replacements}
    prompt = prompt.detach().float().cpu()
    stack = torch.cat([prompt.unsqueeze(0), *(ablated_prompts(prompt, r.float().cpu()) for r in replacements.values())])
    scores = score(backbone, stack, items, batch_size)  # K = 1 + P * len(replacements)
    acc, ll = accuracies(scores), gold_loglik(scores)
    rows, p = [], prompt.shape[0]
    for j, kind in enumerate(replacements):
        for k in range(p):
            i = 1 + j * p + k
            rows.append(RowImportance(k, kind, float(acc[0] - acc[i]), float(ll[0] - ll[i])))
    return RowAblation(float(acc[0]), float(ll[0]), tuple(rows))


def rank_rows(ablation: RowAblation, replacement: Replacement = Replacement.MEAN, by: str = "loglik") -> list[RowImportance]:
    """Rows most important first under one replacement, by `loglik` drop (continuous: small val sets tie on
    accuracy) or `accuracy` drop (ties broken by log-likelihood drop, then position).

    Raises:
        ValueError: `by` is neither, or the ablation has no rows of that replacement.
    """
    if by not in ("loglik", "accuracy"):
        raise ValueError(f"rank rows by 'loglik' or 'accuracy', got {by!r}")
    rows = [row for row in ablation.rows if row.replacement == Replacement(replacement)]
    if not rows:
        raise ValueError(f"no rows were ablated with the {Replacement(replacement).value!r} replacement (a random init has no init rows)")
    key = (lambda r: (-r.loglik_drop, r.position)) if by == "loglik" else (lambda r: (-r.accuracy_drop, -r.loglik_drop, r.position))
    return sorted(rows, key=key)


def importance_vector(ablation: RowAblation, replacement: Replacement = Replacement.MEAN, by: str = "loglik") -> np.ndarray:
    """`[P]` importances in position order (the input of `persisted_vs_drifted`)."""
    rows = sorted(rank_rows(ablation, replacement, by), key=lambda r: r.position)
    return np.array([r.loglik_drop if by == "loglik" else r.accuracy_drop for r in rows])


@dataclass(frozen=True)
class PersistenceTest:
    """Persisted rows' mean importance minus drifted rows', pooled, with a within-prompt permutation p-value."""

    statistic: float  # mean over persisted rows - mean over drifted rows (NaN: no prompt has both)
    p_value: float  # one-sided: share of relabellings (observed included) with a statistic >= the observed
    persisted: int  # rows, over the prompts used
    drifted: int
    prompts: int  # prompts with both persisted and drifted rows (the others cannot be relabelled)
    permutations: int  # relabellings compared, the observed one included
    exact: bool  # every within-prompt relabelling enumerated (else a seeded random sample)


def persisted_vs_drifted(
    importances: Sequence[Sequence[float]], persisted: Sequence[Sequence[bool]],
    permutations: int = PERMUTATIONS, seed: int = 0, exact_limit: int = EXACT_LIMIT,
) -> PersistenceTest:
    """Are rows that kept their init token more important than rows that drifted? A permutation test.

    Under the null, which rows of a prompt persisted is unrelated to their importance, so the persisted
    labels are shuffled among the rows of each prompt (counts per prompt kept); prompts, seeds and
    tasks are pooled. Prompts whose rows all persisted or all drifted are left out: they compare nothing.

    Args:
        importances: per prompt, `[P_g]` row importances (`importance_vector`).
        persisted: per prompt, `[P_g]` flags (`RowReading.persisted`).
        permutations: relabellings sampled when more than `exact_limit` exist.
        seed: seeds the sampling (numpy Generator).

    Raises:
        ValueError: the two lists differ in length, or a prompt's flags and importances do.
    """
    if len(importances) != len(persisted):
        raise ValueError(f"{len(importances)} importance vectors but {len(persisted)} persisted vectors; give one of each per prompt")
    groups = []
    for g, (values, flags) in enumerate(zip(importances, persisted)):
        values, flags = np.asarray(values, dtype=float), np.asarray(flags, dtype=bool)
        if values.shape != flags.shape or values.ndim != 1:
            raise ValueError(f"prompt {g}: {values.shape} importances but {flags.shape} persisted flags; give one of each per row")
        if 0 < flags.sum() < flags.size:
            groups.append((values, flags))
    n_persisted = sum(int(f.sum()) for _, f in groups)
    n_drifted = sum(int((~f).sum()) for _, f in groups)
    if not groups:
        return PersistenceTest(math.nan, math.nan, 0, 0, 0, 0, False)
    total = sum(float(v.sum()) for v, _ in groups)
    # The statistic is increasing in the persisted rows' summed importance S: compare S across relabellings.
    observed = sum(float(v[f].sum()) for v, f in groups)
    sums, exact = _relabelled_sums(groups, permutations, seed, exact_limit)
    tolerance = 1e-9 * max(1.0, abs(observed))  # equal sums reached in another order count as ties
    p_value = float((sums >= observed - tolerance).mean())
    statistic = observed / n_persisted - (total - observed) / n_drifted
    return PersistenceTest(statistic, p_value, n_persisted, n_drifted, len(groups), len(sums), exact)


def _relabelled_sums(groups: list[tuple[np.ndarray, np.ndarray]], permutations: int, seed: int, exact_limit: int) -> tuple[np.ndarray, bool]:
    """The persisted rows' pooled importance under every within-prompt relabelling (or a sample plus the observed)."""
    count = math.prod(math.comb(f.size, int(f.sum())) for _, f in groups)
    if count <= exact_limit:
        per_group = [np.array([v[list(c)].sum() for c in itertools.combinations(range(v.size), int(f.sum()))]) for v, f in groups]
        return reduce(lambda a, b: (a[:, None] + b[None, :]).ravel(), per_group), True  # [count]
    rng = np.random.default_rng(seed)
    sums = np.zeros(permutations)
    for values, flags in groups:
        shuffled = rng.permuted(np.tile(flags, (permutations, 1)), axis=1)  # [R, P_g]
        sums += (shuffled * values).sum(1)
    observed = sum(float(v[f].sum()) for v, f in groups)
    return np.concatenate([[observed], sums]), False
