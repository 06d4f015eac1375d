"""Prompt similarity measures (ON included, on a fixed probe set) and their ranking as predictors of transfer."""

from __future__ import annotations

import torch
from torch import Tensor

from softprompt.analysis.similarity import rank_predictors, similarity_matrices
from softprompt.backbones.loading import Backbone
from softprompt.analysis.ffn_probes import ffn_activation_rates
from softprompt.data.batch import Encoded, pad


def probe_contexts(items: dict[str, list[Encoded]], per_task: int) -> list[list[int]]:
    """The fixed probe set of the ON measure: the contexts of the first `per_task` eval items of each task."""
    return [item.context for task_items in items.values() for item in task_items[:per_task]]


def probe_rates(backbone: Backbone, prompt: Tensor, contexts: list[list[int]], batch_size: int) -> Tensor:
    """`ffn_activation_rates` over the whole probe set, in batches (weighted by real tokens): `[L, I]`."""
    total, tokens = None, 0
    for start in range(0, len(contexts), batch_size):
        ids, mask = pad(contexts[start : start + batch_size], backbone.tokenizer.pad_token_id)
        n = int(mask.sum())
        rates = ffn_activation_rates(backbone.model, prompt.to(backbone.device), ids.to(backbone.device), mask.to(backbone.device)) * n
        total, tokens = (rates if total is None else total + rates), tokens + n
    return total / tokens


def similarity_measures(backbone: Backbone, prompts: Tensor, contexts: list[list[int]], batch_size: int) -> dict:
    """Every measure's `[T, T]` matrix for stacked prompts `[T, P, H]` (ON only with a probe set)."""
    rates = torch.stack([probe_rates(backbone, p, contexts, batch_size) for p in prompts]) if contexts else None
    return {name: m.tolist() for name, m in similarity_matrices(prompts, rates).items()}


def predictors(measures: dict, transfer: dict, spot: dict) -> list[dict]:
    """The measures ranked by how well they predict zero-shot and (if run) SPoT transfer."""
    kinds = {"zero-shot gain": transfer["gain_accuracy"]}
    if spot.get("tasks") == transfer["tasks"]:
        kinds["SPoT gain"] = spot["gain"]
    return rank_predictors(measures, kinds)
