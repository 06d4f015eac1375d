"""The study's grid: one training run per (task, seed), named `<task>-s<seed>`, trained by an executor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from softprompt.backbones.loading import Backbone
from softprompt.io.runs import RUN_FILE, config_differences, is_done, read_run
from softprompt.io.sources import source_sha256
from softprompt.study.config import StudyConfig
from softprompt.study.executors import ExecutorConfig, RunJob, run_jobs
from softprompt.tasks.registry import is_task_file
from softprompt.train.config import TrainConfig

IN_PROCESS = ExecutorConfig(workers="1")  # the library's default: every run in the caller's process
RESULT_NEUTRAL_KEYS = ("device", "eval_batch_size")  # a finished run with other values still counts as the same run


def task_key(task: str) -> str:
    """A file-name-safe name for a `tasks` entry: a built-in's name, or a task file's stem."""
    return Path(task).stem if is_task_file(task) else task


def run_name(task: str, seed: int) -> str:
    return f"{task_key(task)}-s{seed}"


def train_all(
    config: StudyConfig, out_dir: Path, backbone: Backbone | None, data_dir: str | Path | None, progress: bool, echo: Callable[[str], None],
    executor: ExecutorConfig | None = None,
) -> dict[str, str]:
    """Train every (task, seed) not already done, resuming unfinished ones, with `executor`. Returns {run name: status}.

    Raises:
        ValueError: a done run was trained with a different config (the message names the keys).
    """
    jobs, statuses = [], {}
    data_dir = None if data_dir is None else str(Path(data_dir).resolve())  # workers may run elsewhere
    grid = [(task, seed) for task in config.tasks for seed in config.seeds]
    for i, (task, seed) in enumerate(grid, start=1):
        name, train_config, label = run_name(task, seed), config.train_config(task, seed), f"run {i}/{len(grid)}: {task} seed {seed}"
        run_dir = (out_dir / "runs" / name).resolve()
        if reusable(train_config, run_dir):
            echo(f"{label} (done, skipped)")
            statuses[name] = "done"
            continue
        statuses[name] = "pending"  # keeps the grid's order
        jobs.append(RunJob(name, train_config, str(run_dir), data_dir, label))
    for name, outcome in run_jobs(jobs, executor or IN_PROCESS, backbone, echo, progress).items():
        statuses[name] = "done" if outcome.status == "skipped" else outcome.status  # skipped: another process finished it
    return statuses


def done_before(config: StudyConfig, out_dir: Path) -> list[str]:
    """The grid runs already done in `out_dir`: what this call of the study reuses rather than trains."""
    names = [run_name(task, seed) for task in config.tasks for seed in config.seeds]
    return [name for name in names if is_done(out_dir / "runs" / name)]


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
    saved = read_run(run_dir).get("init_from_sha256")
    if config.init_from and saved is not None and saved != source_sha256(config.init_from):
        raise ValueError(
            f"{run_dir} was trained from another version of its source prompt {config.init_from} (retrained since: "
            f"checksum {saved[:12]}... then, {source_sha256(config.init_from)[:12]}... now); delete that run folder to retrain it"
        )
    return True


def val_accuracy(run_dir: Path) -> float | None:
    """A finished run's val accuracy; None when it did not finish (diverged)."""
    record = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else {}
    return record["val"]["accuracy"] if record.get("status") == "done" else None


@dataclass(frozen=True)
class FinishedRuns:
    """Which grid runs finished: each task's done seeds and the run that stands for the task (None: no run finished)."""

    seeds_of: dict[str, list[int]]
    representative: dict[str, str | None]


def finished_runs(config: StudyConfig, statuses: dict[str, str]) -> FinishedRuns:
    """The done seeds of each task and its representative: the transfer seed's run, else the first done seed's."""
    seeds_of = {task: [s for s in config.seeds if statuses.get(run_name(task, s)) == "done"] for task in config.tasks}
    representative = {}
    for task, seeds in seeds_of.items():
        seed = config.representative_seed if config.representative_seed in seeds else (seeds[0] if seeds else None)
        representative[task] = None if seed is None else run_name(task, seed)
    return FinishedRuns(seeds_of, representative)
