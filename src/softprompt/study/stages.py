"""The study's newer stages: accuracy intervals, similarity measures (ON included), SPoT, ablations, drift.

The training stages hand `pipeline` their runs as {run folder: TrainConfig} (trained by the study's
executor, like the grid) and read the finished folders back; `pipeline.analyse` puts their JSON-ready
output into results.json. Layout added to a study folder:
    spot/<source>__<target>/    SPoT: target trained from source's prompt for `spot_steps` steps
    spot/default__<target>/     the same budget from the target's own init
    ablation/<task>-<init>-p<N>/   Lester's ablation grid (prompt length x init), one seed
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from softprompt.analysis.drift import Snapshot, drift
from softprompt.analysis.interpret import run_init_ids
from softprompt.analysis.similarity import rank_predictors, similarity_matrices
from softprompt.analysis.statistics import Interval, accuracy_interval, beats
from softprompt.backbones.loading import Backbone
from softprompt.core.forward import ffn_activation_rates
from softprompt.core.prompt import InitMethod
from softprompt.data.batch import Encoded, pad
from softprompt.eval.scoring import Scores
from softprompt.io.runs import RUN_FILE, is_done, load_prompt, read_run
from softprompt.io.runs import SNAPSHOT_DIR, config_differences
from softprompt.train.config import TrainConfig

RESULT_NEUTRAL_KEYS = ("device", "eval_batch_size")


def _interval_json(interval: Interval) -> dict:
    return dataclasses.asdict(interval)


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


# --- similarity measures -------------------------------------------------------------------------


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


# --- training stages -----------------------------------------------------------------------------


def reusable(config: TrainConfig, run_dir: Path) -> bool:
    """True when `run_dir` holds a finished run of `config` (to skip); False when it must be (re)trained.

    Raises:
        ValueError: a done run was trained with another config (the keys are named).
    """
    if not is_done(run_dir):
        return False
    differ = config_differences(read_run(run_dir).get("config", {}), config, ignore=RESULT_NEUTRAL_KEYS)
    if differ:
        detail = ", ".join(f"{k}: run {saved!r} vs study {wanted!r}" for k, (saved, wanted) in differ.items())
        raise ValueError(
            f"{run_dir} was trained with a different config ({detail}); use another --out, or delete that run folder to retrain it"
        )
    return True


def _val_accuracy(run_dir: Path) -> float | None:
    """A finished run's val accuracy; None when it did not finish (diverged)."""
    record = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else {}
    return record["val"]["accuracy"] if record.get("status") == "done" else None


def spot_jobs(base: dict[str, TrainConfig], sources: dict[str, Path], steps: int, out_dir: Path) -> dict[Path, TrainConfig]:
    """SPoT's runs: each target for `steps` steps from every other task's prompt, and from its own init.

    Args:
        base: each task's training config (the study's, for the representative seed).
        sources: each task's representative run folder (its prompt is the source).

    Returns:
        {run folder `spot/<source>__<target>` (source `default`: the target's own init): config}.
    """
    jobs = {}
    for target in sources:
        budget = dataclasses.replace(base[target], max_steps=steps, snapshot_every=None)
        jobs[out_dir / "spot" / f"default__{target}"] = budget
        for source in sources:
            if source != target:
                jobs[out_dir / "spot" / f"{source}__{target}"] = dataclasses.replace(budget, init=InitMethod.PROMPT, init_from=str(sources[source]))
    return jobs


def spot_results(tasks: list[str], steps: int, out_dir: Path) -> dict:
    """The SPoT matrices from the finished `spot/` runs.

    Returns:
        `tasks`, `steps`, `default` (target val accuracy from its own init), `accuracy` `[S, T]`
        (rows: source prompt; diagonal nan), `gain` = accuracy minus the target's default (the SPoT
        gain matrix), `missing` (runs that did not finish).
    """
    accuracy = np.full((len(tasks), len(tasks)), math.nan)
    default, missing = {}, []
    for j, target in enumerate(tasks):
        for source in ["default", *(t for t in tasks if t != target)]:
            value = _val_accuracy(out_dir / "spot" / f"{source}__{target}")
            if value is None:
                missing.append(f"{source}__{target}")
            elif source == "default":
                default[target] = value
            else:
                accuracy[tasks.index(source), j] = value
    baseline = np.array([default.get(t, math.nan) for t in tasks])
    return {"tasks": tasks, "steps": steps, "default": default, "accuracy": accuracy.tolist(),
            "gain": (accuracy - baseline[None, :]).tolist(), "missing": missing}


def _ablation_dir(out_dir: Path, task: str, init: str, n: int) -> Path:
    return out_dir / "ablation" / f"{task}-{init}-p{n}"


def ablation_jobs(base: dict[str, TrainConfig], lengths: tuple[int, ...], inits: tuple[str, ...], out_dir: Path) -> dict[Path, TrainConfig]:
    """Lester's ablation grid: every (task, init, prompt length), one seed (the base config's)."""
    return {
        _ablation_dir(out_dir, task, init, n): dataclasses.replace(config, init=InitMethod(init), num_tokens=n, init_from=None, snapshot_every=None)
        for task, config in base.items() for init in inits for n in lengths
    }


def ablation_results(tasks: list[str], lengths: tuple[int, ...], inits: tuple[str, ...], out_dir: Path) -> dict:
    """`{"lengths", "inits", "accuracy": {task: {init: [val accuracy per length, None if not finished]}}}`."""
    accuracy = {task: {init: [_val_accuracy(_ablation_dir(out_dir, task, init, n)) for n in lengths] for init in inits} for task in tasks}
    return {"lengths": list(lengths), "inits": list(inits), "accuracy": accuracy}


def drifts(backbone: Backbone, run_dirs: dict[str, Path]) -> dict:
    """`analysis.drift.drift` for every run that saved snapshots (`snapshot_every`), by run name."""
    out = {}
    for name, run_dir in run_dirs.items():
        files = sorted((run_dir / SNAPSHOT_DIR).glob("epoch-*.safetensors"))
        if not files:
            continue
        snapshots = []
        for path in files:
            prompt, meta = load_prompt(path, hidden_size=backbone.hidden_size)
            snapshots.append(Snapshot(int(meta["epoch"]), int(meta["step"]), prompt))
        record = read_run(run_dir)
        init_ids = run_init_ids(record, backbone.tokenizer, snapshots[0].prompt.shape[0])
        out[name] = {"task": record["task"], "seed": record["config"]["seed"], **drift(backbone.model, backbone.tokenizer, snapshots, init_ids)}
    return out
