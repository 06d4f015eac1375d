"""SPoT (Vu et al. 2022): each target trained for a few steps from every other task's prompt, and from its own init.

Runs go to the study folder, trained by the study's executor like the grid:
    spot/<source>__<target>/    target trained from source's prompt for `spot_steps` steps
    spot/default__<target>/     the same budget from the target's own init
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from softprompt.core.prompt import InitMethod
from softprompt.study.grid import val_accuracy
from softprompt.train.config import TrainConfig


def spot_jobs(
    base: dict[str, TrainConfig], sources: dict[str, Path], steps: int, out_dir: Path, val_examples: int | None = None,
) -> dict[Path, TrainConfig]:
    """SPoT's runs: each target for `steps` steps from every other task's prompt, and from its own init.

    Args:
        base: each task's training config (the study's, for the representative seed).
        sources: each task's representative run folder (its prompt is the source).
        val_examples: score each run on at most this many val examples (the seeded subsample); None: the task's own.

    Returns:
        {run folder `spot/<source>__<target>` (source `default`: the target's own init): config}.
    """
    jobs = {}
    for target in sources:
        own = base[target].max_val_examples
        val = own if val_examples is None else min(val_examples, own or val_examples)
        budget = dataclasses.replace(base[target], max_steps=steps, snapshot_every=None, max_val_examples=val)
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
            value = val_accuracy(out_dir / "spot" / f"{source}__{target}")
            if value is None:
                missing.append(f"{source}__{target}")
            elif source == "default":
                default[target] = value
            else:
                accuracy[tasks.index(source), j] = value
    baseline = np.array([default.get(t, math.nan) for t in tasks])
    return {"tasks": tasks, "steps": steps, "default": default, "accuracy": accuracy.tolist(),
            "gain": (accuracy - baseline[None, :]).tolist(), "missing": missing}
