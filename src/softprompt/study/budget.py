"""Does a study's budget fit its tasks' splits? Checked once the split sizes are known, before anything trains.

The TOML's type check (`StudyConfig.from_dict`) stays free of I/O; this is where the study first reads the
data, so a budget that asks for more examples than a split holds stops here, naming the key, the task and
the split's size (a subsample "larger than the split" would otherwise quietly become the whole split).
"""

from __future__ import annotations

from pathlib import Path

from softprompt.study.config import StudyConfig
from softprompt.tasks.registry import get_task
from softprompt.data.splits import make_splits


def check_budgets(config: StudyConfig, data_dir: str | Path | None) -> dict[str, dict[str, int]]:
    """Check every task's `max_train_examples` (and `anchor_max_train_examples`) and val subsample against its splits; return the splits' sizes.

    Returns:
        {task: {"train": examples after the dev slice, "dev": dev slice, "val": whole val split}}.

    Raises:
        ValueError: a subsample larger than its split (the key, the task and the split's size are named).
    """
    sizes = {}
    for task in config.tasks:
        wanted = config.train_config(task, config.seeds[0])
        options = {**wanted.split_options(), "max_train_examples": None, "max_val_examples": None}
        whole = make_splits(get_task(task), data_dir, **options)
        sizes[task] = {"train": len(whole.train), "dev": len(whole.dev), "val": len(whole.val)}
        _check_fit(wanted.max_train_examples, len(whole.train), _key(config, task, "max_train_examples"), task,
                   "train split after the dev slice")
        _check_fit(wanted.max_val_examples, len(whole.val), _key(config, task, "max_val_examples"), task, "val split")
        if task in config.anchor_tasks:  # the anchor sweep's own train subsample
            _check_fit(config.anchor_max_train_examples, len(whole.train), "`anchor_max_train_examples`", task, "train split after the dev slice")
    return sizes


def _key(config: StudyConfig, task: str, key: str) -> str:
    """The TOML key that set `key` for `task`: its [per_task] table or the shared key."""
    if key in config.per_task.get(task, {}):
        return f"[per_task.{task}] `{key}`"
    return f"`{key}`"


def _check_fit(wanted: int | None, available: int, key: str, task: str, split: str) -> None:
    if wanted is not None and wanted > available:
        raise ValueError(
            f"{key} = {wanted} does not fit: {task}'s {split} has {available} examples; "
            f"set it to {available} or less (or leave it out to use the whole split)"
        )
