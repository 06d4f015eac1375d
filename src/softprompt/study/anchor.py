"""The anchor trade-off (issue 21): each of `anchor_tasks` trained at every weight G, in `anchor/<task>-g<G>/`.

Every run starts from the task's representative-seed config at the sweep's own budget (`anchor_epochs`,
`anchor_max_train_examples`), G = 0 included, so every point of a task's curve had the same budget;
the grid's run is never reused. Each point is read from its run folder: val accuracy with a Wilson
interval over the val examples, faithfulness (rows whose nearest token is their anchor token) with a
Wilson interval over the P rows, and the root-mean-square row distance to the anchor.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from softprompt.analysis.statistics import wilson_interval
from softprompt.backbones.loading import Backbone
from softprompt.io.runs import RUN_FILE, is_done, load_prompt, read_run
from softprompt.study.grid import task_key
from softprompt.train.anchor import anchor_embeddings, anchor_penalty, weight_text
from softprompt.train.config import TrainConfig


def weight_name(weight: float) -> str:
    """`g<G>`: g0, g0.03, g1, g1e-05."""
    return "g" + weight_text(weight)


def anchor_dir(out_dir: Path, task: str, weight: float) -> Path:
    return out_dir / "anchor" / f"{task_key(task)}-{weight_name(weight)}"


def anchor_jobs(
    base: dict[str, TrainConfig], weights: tuple[float, ...], epochs: int | None, max_train_examples: int | None, out_dir: Path
) -> dict[Path, TrainConfig]:
    """Every (task, G) run: the task's `base` config at the sweep's budget (None: the task's own) with `anchor_weight` G."""
    jobs = {}
    for task, config in base.items():
        budget = dataclasses.replace(
            config, epochs=epochs or config.epochs, max_train_examples=max_train_examples or config.max_train_examples, snapshot_every=None
        )
        jobs |= {anchor_dir(out_dir, task, g): dataclasses.replace(budget, anchor_weight=g) for g in weights}
    return jobs


def anchor_results(backbone: Backbone, tasks: tuple[str, ...], weights: tuple[float, ...], out_dir: Path) -> dict:
    """`{"tasks", "weights", "points": {task: [point per weight, None if not done]}, "missing": [run folder: status]}`.

    A point is `{"weight", "run", "accuracy", "faithfulness"}` (Wilson intervals, percent),
    `"distance"` (sqrt of mean over rows ||p_i - e_i||^2, e the run's anchor text's embeddings) and `"steps"`.
    """
    points: dict[str, list[dict | None]] = {}
    missing = []
    for task in tasks:
        points[task] = []
        for g in weights:
            run_dir = anchor_dir(out_dir, task, g)
            point = anchor_point(backbone, run_dir) if is_done(run_dir) else None
            if point is None:
                status = read_run(run_dir).get("status", "unknown") if (run_dir / RUN_FILE).is_file() else "not trained"
                missing.append(f"{run_dir.parent.name}/{run_dir.name}: {status}")
            points[task].append(point)
    return {"tasks": list(tasks), "weights": list(weights), "points": points, "missing": missing}


def anchor_point(backbone: Backbone, run_dir: Path) -> dict:
    """One finished run's point of the curve (see `anchor_results`)."""
    record = read_run(run_dir)
    prompt, _ = load_prompt(run_dir, hidden_size=backbone.hidden_size)  # [P, H]
    rows = prompt.shape[0]
    anchor = anchor_embeddings(backbone.model, backbone.tokenizer, record["anchor"]["text"], rows)  # [P, H]
    val = record["val"]
    on_anchor = round(record["faithfulness"] * rows)
    return {
        "weight": record["anchor"]["weight"],
        "run": f"{run_dir.parent.name}/{run_dir.name}",
        "accuracy": dataclasses.asdict(wilson_interval(round(val["accuracy"] * val["n"] / 100), val["n"])),
        "faithfulness": dataclasses.asdict(wilson_interval(on_anchor, rows)),
        "rows_on_anchor": on_anchor,
        "distance": math.sqrt(float(anchor_penalty(prompt, anchor, 1.0))),
        "steps": record["steps"],
    }
