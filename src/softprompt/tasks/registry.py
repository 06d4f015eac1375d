"""The registry of tasks: every `--task` value, a built-in name or the path of any task file, resolves here.

The built-ins (SuperGLUE's CB, RTE, COPA, WSC, WiC, MultiRC, BoolQ) are task files in `builtin/`
(lm-evaluation-harness's YAML, read by `taskfile`), named in the literal dict `TASKS`; any other task
file works the same way. `get_task` and `load_examples` are what the rest of softprompt calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from softprompt.tasks.data import DATA_DIR_ENV, DataError, Example, read_jsonl, require, resolve_data_dir, short  # noqa: F401 - re-exported
from softprompt.tasks.taskfile import SUPERGLUE_RELEASE, Task, TaskFileError, load_task_examples, load_task_file  # noqa: F401

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_NAMES = ("cb", "rte", "copa", "wsc", "wic", "multirc", "boolq")
TASKS: dict[str, Task] = {name: load_task_file(BUILTIN_DIR / f"{name}.yaml") for name in BUILTIN_NAMES}


def is_task_file(name: str) -> bool:
    """A `--task` value that names a file rather than a built-in (it ends in .yaml/.yml or has a path separator)."""
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def get_task(name: str | Path) -> Task:
    """The built-in task called `name` (case-insensitive), or the task file at path `name`.

    Raises:
        ValueError: unknown name (the message lists the built-ins and says a path works too);
            TaskFileError for a task file that is missing or malformed.
    """
    name = str(name)
    if is_task_file(name):
        return load_task_file(name)
    task = TASKS.get(name.lower())
    if task is None:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}, or give the path of a task file (.yaml)")
    return task


def load_examples(task: Task, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """All examples of one split (`train`, `val` or `test`) of a task.

    Raises:
        DataError: missing folder, file or split, malformed line or row, missing field, field of
            the wrong type, unknown label, or a template or `!function` that fails (place named).
    """
    if split == "test" and task.dataset_path == SUPERGLUE_RELEASE:
        raise DataError("the SuperGLUE test split has no labels; use 'train' or 'val'")
    return load_task_examples(task, split, data_dir)


def majority_rate(labels: Sequence[int]) -> float:
    """Accuracy of always answering the most common label, in percent: `tasks` and the study both report it.

    Raises:
        ValueError: no labels (an empty split has no majority class).
    """
    if not labels:
        raise ValueError("majority_rate needs at least one label; the split is empty")
    return 100.0 * max(Counter(labels).values()) / len(labels)


def task_summary(task: Task, data_dir: str | Path | None = None) -> dict:
    """Name, file, output type, examples per split (None: no such split; a string: why it cannot be read),
    the fixed choices (or "per example"), the val split's majority-class rate and the task's notes."""
    sizes, majority = {}, None
    for split in ("train", "val"):
        if task.splits[split] is None:
            sizes[split] = None
            continue
        try:
            examples = load_examples(task, split, data_dir)
        except DataError as e:
            sizes[split] = f"unreadable ({e})"
            continue
        sizes[split] = len(examples)
        if split == "val" and task.output_type.value == "multiple_choice":
            majority = majority_rate([e.label for e in examples])
    choices = task.choice_list
    return {
        "task": task.name,
        "file": str(task.source),
        "output_type": task.output_type.value,
        "splits": sizes,
        "choices": list(choices) if choices else "per example",
        "majority_class": majority,
        "notes": list(task.notes),
    }
