"""Metrics that depend on how a task groups its examples: SuperGLUE MultiRC's F1a and EM.

MultiRC has one example per answer (label 1 = a correct answer); its official metrics are F1a, the
binary F1 of label 1 over all answers, and EM, the share of questions whose answers are all
labelled right. Any task file with `group_by` gets them, beside accuracy.
"""

from __future__ import annotations

from collections import defaultdict

from sklearn.metrics import f1_score
from torch import Tensor

from softprompt.eval.scoring import Scores, metrics
from softprompt.tasks.data import Example


def grouped_metrics(predicted: Tensor, labels: Tensor, groups: list[str]) -> dict[str, float]:
    """F1a over answers (label 1 is the positive class) and EM over groups, in percent.

    Args:
        predicted, labels: `[E]` choice indices (0 = no, 1 = yes).
        groups: `E` group ids (MultiRC: the question each answer belongs to).
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group ids for {len(labels)} examples; give one per example")
    right = defaultdict(list)
    for group, p, y in zip(groups, predicted.tolist(), labels.tolist()):
        right[group].append(p == y)
    return {
        "f1a": 100.0 * float(f1_score(labels.numpy(), predicted.numpy(), pos_label=1, average="binary", zero_division=0)),
        "em": 100.0 * sum(all(r) for r in right.values()) / len(right),
        "groups": len(right),
    }


def task_metrics(scores: Scores, examples: list[Example], prompt_index: int = 0) -> dict[str, float]:
    """`metrics` (accuracy, exact match, macro-F1, loss) plus F1a and EM when the examples carry groups."""
    result = metrics(scores, prompt_index)
    if any(e.group is not None for e in examples):
        result |= grouped_metrics(scores.predictions()[prompt_index], scores.labels, [str(e.group) for e in examples])
    return result
