"""A study: train every (task, seed), evaluate, analyse, report. Resumable at every stage.

Layout of a study folder:
    study.json              the resolved study config
    runs/<task>-s<seed>/    one training run each (prompt.safetensors + run.json)
    anchor/<task>-g<G>/     the anchor sweep's runs, one per (task, anchor weight G), when `anchor_weights` is set
    scores/<source>__<task>.json
                            cached per-example scores of one prompt (or none / the text prompt) on one
                            task's eval set, keyed by the prompt's checksum and the eval set's fingerprint
    results.json            every number the report shows
    report.html, *.csv, *.png   written by `softprompt.report.html` from results.json

A run whose run.json says `done` is never retrained; an unfinished one (half-written, crashed, killed)
resumes from its last checkpoint (from step 0 when it has none). Scores are recomputed only when the
prompt, the eval set or the backbone changed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softprompt.analysis import measures as analysis
from softprompt.backbones.loading import Backbone
from softprompt.core.prompt import embed_text
from softprompt.data.batch import Encoded
from softprompt.eval.task_metrics import task_metrics
from softprompt.io.runs import atomic_write_json, load_prompt, provenance, read_run
from softprompt.study import ablation, spot
from softprompt.study import anchor
from softprompt.study.budget import check_budgets
from softprompt.study.drift import drifts
from softprompt.study.interpretation import interpret_runs
from softprompt.study.similarity import predictors, probe_contexts, similarity_measures
from softprompt.study.config import StudyConfig
from softprompt.study.executors import ExecutorConfig, RunJob, run_jobs, worker_backbone
from softprompt.study.grid import IN_PROCESS, FinishedRuns, done_before, finished_runs, reusable, run_name, train_all
from softprompt.study.results import (
    RESULTS_FILE,
    accuracy_intervals,
    interpretation,
    json_safe,
    protocol,
    run_summary,
    similarity,
    stochasticity,
    task_evaluation,
    transfer,
)
from softprompt.study.score_cache import cached_scores, eval_set
from softprompt.tasks.registry import Example, get_task
from softprompt.train.config import TrainConfig

STUDY_FILE = "study.json"


# --- the study ---------------------------------------------------------------------------------


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    executor: ExecutorConfig | None = None,
) -> dict:
    """Train, evaluate and analyse every (task, seed) of a study, then write results.json and the report.

    Re-running continues: done runs and cached scores are reused. `executor` says where the runs
    train (default: one after another in this process; local workers; Ray); the analysis runs here.

    Returns:
        The results (also in `out_dir/results.json`).
    """
    from softprompt.report.html import write_report  # the report reads results.json; imported late to keep matplotlib out of training

    out_dir = Path(out_dir)
    started = time.time()
    split_sizes = check_budgets(config, data_dir)  # a budget that cannot fit stops the study before anything is written
    atomic_write_json(out_dir / STUDY_FILE, config.to_json())
    reused = done_before(config, out_dir)
    statuses = train_all(config, out_dir, backbone, data_dir, progress, echo, executor)
    grid_done = time.time()
    device, dtype, attention = (config.train.get(key, "auto") for key in ("device", "dtype", "attention"))
    backbone = backbone or worker_backbone(config.model, device, dtype, attention)  # the one in-process runs loaded
    finished = finished_runs(config, statuses)
    staged = train_stages(config, out_dir, backbone, data_dir, finished, progress, echo, executor)
    analysis_started = time.time()
    results = analyse(config, out_dir, backbone, data_dir, statuses, finished, echo, progress, staged)
    results["analysis_wall_s"] = round(time.time() - analysis_started, 1)  # scoring, interpretation, statistics
    results["wall_s"] = round(time.time() - started, 1)  # this call, training included (resumed runs count 0)
    results["stage_wall_s"] = {  # this call's time per stage; reused runs and cached scores cost ~0 here
        "grid training": round(grid_done - started, 1),
        "SPoT, ablation and anchor-sweep training (backbone load included)": round(analysis_started - grid_done, 1),
        "scoring and analysis": round(results["analysis_wall_s"] - results.get("interpretation_wall_s", 0.0), 1),
    }
    if "interpretation_wall_s" in results:
        results["stage_wall_s"]["interpretation"] = results["interpretation_wall_s"]
    results["protocol"]["whole_splits"] = split_sizes  # {task: train after the dev slice, dev, val}
    for name in reused:
        results["runs"][name]["reused"] = True
    atomic_write_json(out_dir / RESULTS_FILE, json_safe(results))
    write_report(out_dir)
    echo(f"wrote {out_dir / 'report.html'}")
    return results


def train_stages(
    config: StudyConfig, out_dir: Path, backbone: Backbone | None, data_dir: str | Path | None, finished: FinishedRuns,
    progress: bool, echo: Callable[[str], None], executor: ExecutorConfig | None = None,
) -> dict:
    """The training stages after the grid, with the grid's executor: SPoT (from each task's representative prompt), the ablation
    and the anchor sweep."""
    sources = {t: (out_dir / "runs" / r).resolve() for t, r in finished.representative.items() if r}
    base = {t: config.train_config(t, config.representative_seed) for t in config.tasks}
    wanted: dict[Path, TrainConfig] = {}
    if config.spot_steps and len(sources) > 1:
        wanted |= spot.spot_jobs({t: base[t] for t in sources}, sources, config.spot_steps, out_dir.resolve(), config.spot_val_examples)
    if config.ablation_lengths:
        wanted |= ablation.ablation_jobs(base, config.ablation_lengths, config.ablation_inits, out_dir.resolve())
    if config.anchor_weights:  # the anchor trade-off: every anchor task at every G, at the sweep's budget
        swept = {t: base[t] for t in config.anchor_tasks}
        wanted |= anchor.anchor_jobs(swept, config.anchor_weights, config.anchor_epochs, config.anchor_max_train_examples, out_dir.resolve())
    todo = {run_dir: c for run_dir, c in wanted.items() if not reusable(c, run_dir)}
    data = None if data_dir is None else str(Path(data_dir).resolve())
    jobs = [RunJob(f"{d.parent.name}/{d.name}", c, str(d), data, f"{d.parent.name} {i}/{len(todo)}: {d.name}")
            for i, (d, c) in enumerate(todo.items(), start=1)]
    run_jobs(jobs, executor or IN_PROCESS, backbone, echo, progress)
    out: dict[str, Any] = {}
    if config.spot_steps and len(sources) > 1:
        out["spot"] = spot.spot_results(list(sources), config.spot_steps, out_dir)
    if config.ablation_lengths:
        out["ablation"] = ablation.ablation_results(list(config.tasks), config.ablation_lengths, config.ablation_inits, out_dir)
    if config.anchor_weights:
        out["anchor"] = anchor.anchor_results(backbone, config.anchor_tasks, config.anchor_weights, out_dir)
    return out


def analyse(
    config: StudyConfig, out_dir: Path, backbone: Backbone, data_dir: str | Path | None, statuses: dict[str, str],
    finished: FinishedRuns, echo: Callable[[str], None], progress: bool = False, staged: dict | None = None,
) -> dict:
    """Every analysis of the issue, from the saved runs (never trains)."""
    done = {name: out_dir / "runs" / name for name, status in statuses.items() if status == "done"}
    records = {name: read_run(path) for name, path in done.items()}
    prompts = {name: load_prompt(path, hidden_size=backbone.hidden_size)[0] for name, path in done.items()}
    seeds_of, representative = finished.seeds_of, finished.representative
    batch_size = config.train_config(config.tasks[0], config.seeds[0]).eval_batch_size
    sets = {task: eval_set(task, config, backbone.tokenizer, data_dir) for task in config.tasks}
    items = {task: task_items for task, (_, task_items) in sets.items()}
    evaluation, transfer_scores = evaluate_tasks(config, out_dir, backbone, prompts, finished, sets, echo, progress)
    results = {
        "title": config.name,
        "study": config.to_json(),
        "model": backbone.name,
        "tasks": list(config.tasks),
        "protocol": protocol(config, records, items),
        "runs": {name: run_summary(name, records.get(name), statuses[name]) for name in statuses},
        "evaluation": evaluation,
        "representative": representative,
        "provenance": provenance(),  # versions, machine and git commit, as in each run.json
    }
    tasks_with_prompt = [t for t in config.tasks if representative[t]]
    results["transfer"] = transfer(tasks_with_prompt, representative, transfer_scores, evaluation)
    results["similarity"] = similarity(tasks_with_prompt, representative, prompts, seeds_of)
    results["stochasticity"] = stochasticity(config, prompts, seeds_of)
    if tasks_with_prompt:
        distance = torch.tensor(results["similarity"]["frobenius"])
        for key in ("accuracy", "exact_match"):
            gain = torch.tensor(results["transfer"][f"gain_{key}"])
            results["transfer"][f"correlation_{key}"] = asdict(analysis.similarity_vs_transfer(distance, gain))
    results["interpret"] = {name: interpretation(backbone, records[name], prompts[name], config.top_k) for name in done}
    results |= staged or {}
    if tasks_with_prompt:
        stacked = torch.stack([prompts[representative[t]] for t in tasks_with_prompt])
        probe = probe_contexts({t: items[t] for t in tasks_with_prompt}, config.probe_examples)
        results["similarity"]["measures"] = similarity_measures(backbone, stacked, probe, batch_size)
        results["similarity"]["probe_contexts"] = len(probe)
        results["predictors"] = predictors(results["similarity"]["measures"], results["transfer"], results.get("spot", {}))
    results["drift"] = drifts(backbone, done)
    if config.interpret:
        interpretation_started = time.time()
        chosen = {name: record for name, record in records.items()
                  if record["task"] in (config.interpret_tasks or config.tasks)
                  and record.get("config", {}).get("seed") in (config.interpret_seeds or config.seeds)}
        subset = {task: interpretation_items(task_items, config.interpret_examples) for task, task_items in items.items()}
        results["interpretation"] = interpret_runs(backbone, out_dir, chosen, prompts, subset, batch_size)
        results["interpretation"]["examples"] = {task: len(subset[task]) for task in {r["task"] for r in chosen.values()}}
        results["interpretation_wall_s"] = round(time.time() - interpretation_started, 1)
    return results


def interpretation_items(items: list[Encoded], size: int | None) -> list[Encoded]:
    """The interpretation stage's share of a task's eval set: `size` of its items drawn with seed 0, in order (all when None or more)."""
    if size is None or size >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), size))]


def evaluate_tasks(
    config: StudyConfig, out_dir: Path, backbone: Backbone, prompts: dict[str, Tensor], finished: FinishedRuns,
    sets: dict[str, tuple[list[Example], list[Encoded]]], echo: Callable[[str], None], progress: bool = False,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each task's evaluation block (no prompt, text prompt, every seed, intervals) and every representative prompt's metrics on it.

    The metrics are `task_metrics` of cached scores, the numbers `softprompt evaluate` reports (MultiRC's F1a and EM included).

    Returns:
        ({task: evaluation}, {target task: {source run: metrics}}).
    """
    batch_size = config.train_config(config.tasks[0], config.seeds[0]).eval_batch_size
    representative = finished.representative
    evaluation, transfer_scores = {}, {}
    for task, (examples, items) in sets.items():
        own = {run_name(task, s): prompts[run_name(task, s)] for s in finished.seeds_of[task]}
        others = {representative[t]: prompts[representative[t]] for t in config.tasks if t != task and representative[t]}
        scores = {}
        for sources in ({"none": None}, {f"text-{task}": _text_prompt(backbone, config, task)}, own | others):
            scores |= cached_scores(out_dir, backbone, sources, task, items, batch_size, echo, progress)
        evaluation[task] = task_evaluation(task, finished.seeds_of[task], scores, examples)
        evaluation[task]["intervals"] = accuracy_intervals(
            {k: v for k, v in scores.items() if k not in others}, list(own), torch.tensor([e.label for e in examples]),
            evaluation[task]["majority_class"], seed=config.representative_seed,
        )
        transfer_scores[task] = {source: task_metrics(scores[source], examples) for source in others | own}
    return evaluation, transfer_scores


def _text_prompt(backbone: Backbone, config: StudyConfig, task: str) -> Tensor:
    """The task's good-prompt text as token embeddings (as `softprompt evaluate --text-prompt`)."""
    text = config.train_config(task, config.seeds[0]).init_text or get_task(task).init_text
    return embed_text(backbone.scoring().model, backbone.tokenizer, text)  # fp32's embeddings, as evaluate's

