"""results.json: every number the report shows, assembled from scores and run records, with provenance.

`softprompt.report` reads this file and never the runs; NaN becomes null (`json_safe`) so any tool reads it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softprompt.analysis import measures as analysis
from softprompt.analysis.statistics import Interval, accuracy_interval, beats
from softprompt.analysis.interpret import interpret_prompt, rows_to_json, run_init_ids
from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Encoded
from softprompt.eval.scoring import Scores
from softprompt.eval.task_metrics import task_metrics
from softprompt.study.config import StudyConfig
from softprompt.study.grid import run_name
from softprompt.tasks.registry import Example, majority_rate

RESULTS_FILE = "results.json"


def _interval_json(interval: Interval) -> dict:
    return asdict(interval)


def accuracy_intervals(scores: dict[str, Scores], seed_sources: list[str], labels: Tensor, majority: float, seed: int = 0) -> dict:
    """95% bootstrap intervals over val examples: no prompt, text prompt, each seed, and the seeds' mean.

    The verdict: the seeds' mean beats the baseline max(no prompt, majority class) only when its
    whole interval lies above it; `beats_every_seed` asks the same of each seed's own interval.

    Args:
        scores: per-source scores on one task (keys "none", "text-<task>" and `seed_sources`).
        seed_sources: the task's finished runs (one per seed).
        labels: `[E]`.
    """
    correct = {name: (s.predictions()[0] == labels).numpy() for name, s in scores.items()}
    text = next(k for k in scores if k.startswith("text-"))
    none = accuracy_interval(correct["none"], seed)
    baseline = max(none.estimate, majority)
    out = {"no_prompt": _interval_json(none), "text_prompt": _interval_json(accuracy_interval(correct[text], seed)),
           "baseline": baseline, "seeds": {}}
    for name in seed_sources:
        interval = accuracy_interval(correct[name], seed)
        out["seeds"][name] = {**_interval_json(interval), "beats": beats(interval, baseline)}
    if seed_sources:
        mean = accuracy_interval(np.stack([correct[n] for n in seed_sources]), seed)
        out["mean"] = _interval_json(mean)
        out["beats"] = beats(mean, baseline)
        out["beats_every_seed"] = all(s["beats"] for s in out["seeds"].values())
    return out


def interpretation(backbone: Backbone, record: dict, prompt: Tensor, top_k: int) -> dict:
    init_ids = run_init_ids(record, backbone.tokenizer, prompt.shape[0])
    rows = interpret_prompt(backbone.model, backbone.tokenizer, prompt, init_ids, top_k)
    return {"task": record["task"], "seed": record["config"]["seed"], "rows": rows_to_json(rows)}


def task_evaluation(task: str, seeds: list[int], scores: dict[str, Scores], examples: list[Example]) -> dict:
    """One task's evaluation block: no prompt, text prompt and each seed's `task_metrics`, their mean and sd, the ensemble."""
    labels = torch.tensor([e.label for e in examples])
    per_seed = {str(s): task_metrics(scores[run_name(task, s)], examples) for s in seeds}
    result = {
        "n": len(examples),
        "majority_class": majority_rate(labels.tolist()),
        "no_prompt": task_metrics(scores["none"], examples),
        "text_prompt": task_metrics(scores[f"text-{task}"], examples),
        "seeds": per_seed,
    }
    for key in ("accuracy", "exact_match"):
        values = torch.tensor([m[key] for m in per_seed.values()], dtype=torch.float64)
        result[f"mean_{key}"] = float(values.mean()) if len(values) else math.nan
        result[f"sd_{key}"] = float(values.std()) if len(values) > 1 else math.nan
    if seeds:
        logprobs = torch.cat([scores[run_name(task, s)].logprobs for s in seeds])  # [K, E, C]
        result["ensemble"] = asdict(analysis.ensemble(logprobs, labels))
    return result


def transfer(tasks: list[str], representative: dict[str, str | None], scores: dict[str, dict], evaluation: dict) -> dict:
    """Every task's representative prompt on every task: metric and gain over that task's no-prompt score."""
    out: dict[str, Any] = {"tasks": tasks, "sources": {t: representative[t] for t in tasks}}
    for key in ("accuracy", "exact_match"):
        matrix = torch.tensor([[scores[target][representative[source]][key] for target in tasks] for source in tasks], dtype=torch.float64)
        baseline = torch.tensor([evaluation[t]["no_prompt"][key] for t in tasks], dtype=torch.float64)
        out[key] = matrix.tolist()
        out[f"gain_{key}"] = analysis.transfer_gain(matrix, baseline).tolist()
    return out


def similarity(
    tasks: list[str], representative: dict[str, str | None], prompts: dict[str, Tensor], seeds_of: dict[str, list[int]]
) -> dict:
    if not tasks:
        return {"tasks": []}
    names = [representative[t] for t in tasks]
    stacked = analysis.stack_prompts([prompts[n] for n in names], names)
    centroids = analysis.stack_prompts([torch.stack([prompts[run_name(t, s)] for s in seeds_of[t]]).mean(0) for t in tasks], tasks)
    return {
        "tasks": tasks,
        "prompts": names,
        "frobenius": analysis.distance_matrix(stacked).tolist(),
        "cosine": analysis.cosine_matrix(stacked).tolist(),
        "centroid_frobenius": analysis.distance_matrix(centroids).tolist(),
    }


def stochasticity(config: StudyConfig, prompts: dict[str, Tensor], seeds_of: dict[str, list[int]]) -> dict:
    names = [run_name(t, s) for t in config.tasks for s in seeds_of[t]]
    if not names:
        return {"prompts": []}
    groups = [n.rsplit("-s", 1)[0] for n in names]
    stacked = analysis.stack_prompts([prompts[n] for n in names], names)
    task_names, between = analysis.group_distances(analysis.distance_matrix(stacked), groups)
    out = {
        "prompts": names,
        "groups": groups,
        "norms": analysis.frobenius_norms(stacked).tolist(),
        "spread": {t: asdict(analysis.spread(stacked[[g == t for g in groups]])) for t in task_names},
        "group_distances": {"tasks": task_names, "matrix": between.tolist()},
    }
    try:
        maps = analysis.maps_2d(stacked, seed=config.representative_seed)
        out["maps"] = {k: v.tolist() for k, v in maps.items()}
        out["perplexity"] = analysis.perplexity_for(len(names))
    except ValueError as e:
        out["maps_note"] = str(e)
    return out


def protocol(config: StudyConfig, records: dict[str, dict], items: dict[str, list[Encoded]]) -> dict:
    data = {}
    for task in config.tasks:
        record = next((r for r in records.values() if r["task"] == task), None)
        data[task] = {**(record["data"] if record else {}), "eval": len(items[task])}
    return {"splits": data, "max_val_examples": config.train.get("max_val_examples"), "representative_seed": config.representative_seed}


def run_summary(name: str, record: dict | None, status: str) -> dict:
    if record is None:
        return {"status": status}
    keys = ("task", "status", "best_epoch", "steps", "wall_s", "dev", "val")
    return {**{k: record.get(k) for k in keys}, "seed": record["config"]["seed"], "epochs_run": len(record.get("history", []))}


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null, so results.json is strict JSON that any tool reads."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
