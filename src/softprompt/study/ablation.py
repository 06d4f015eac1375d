"""Lester et al.'s ablation: every (task, init, prompt length), one seed, in `ablation/<task>-<init>-p<N>/`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from softprompt.core.prompt import InitMethod
from softprompt.study.grid import val_accuracy
from softprompt.train.config import TrainConfig


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
    accuracy = {task: {init: [val_accuracy(_ablation_dir(out_dir, task, init, n)) for n in lengths] for init in inits} for task in tasks}
    return {"lengths": list(lengths), "inits": list(inits), "accuracy": accuracy}
