"""A study's config: the grid tasks x seeds, shared and per-task training keys, the stages' keys; TOML with every type checked."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.backbones.loading import DEFAULT_MODEL
from softprompt.core.prompt import InitMethod
from softprompt.flags import flag_help
from softprompt.tasks.registry import get_task
from softprompt.train.config import TrainConfig, load_train_task

PER_RUN_KEYS = ("task", "seed")  # set by the study for each run, not in the config file
SHARED_KEYS = ("model", "num_tokens", "device", "dtype", "attention")  # one backbone, prompts of one shape: never set per task
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_RUN_KEYS)
PER_TASK_KEYS = tuple(k for k in TRAIN_KEYS if k not in SHARED_KEYS)


@dataclass(frozen=True)
class StudyConfig:
    """A study: the grid tasks x seeds, the TrainConfig fields shared by every run, and evaluation choices.

    In TOML every key sits at the top level: the study's own keys below, plus any TrainConfig field
    except `task` and `seed` (`model`, `num_tokens`, `init`, `lr`, `epochs`, `patience`, ...). A
    table `[per_task.<task>]` overrides training keys for one task (`init = "class-labels"`), all
    but the ones that must be shared for prompts to be compared: `model`, `num_tokens`, `device`.
    """

    tasks: tuple[str, ...] = field(metadata=flag_help("Tasks to train, e.g. [\"cb\", \"rte\", \"copa\", \"wsc\"]."))
    seeds: tuple[int, ...] = field(metadata=flag_help("Training seeds; one run per (task, seed)."))
    train: dict[str, Any] = field(default_factory=dict, metadata=flag_help("TrainConfig fields shared by every run."))
    per_task: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata=flag_help("Training keys for one task, overriding the shared ones: [per_task.rte] init = ...")
    )
    transfer_seed: int | None = field(
        default=None, metadata=flag_help("Whose prompt stands for a task in transfer and similarity (default: the first seed).")
    )
    top_k: int = field(default=3, metadata=flag_help("Nearest tokens per prompt row."))
    name: str = field(default="", metadata=flag_help("A title for the report."))
    spot_steps: int = field(
        default=16, metadata=flag_help("SPoT: optimizer steps for every (source -> target) run and its default-init twin; 0 turns SPoT off.")
    )
    probe_examples: int = field(
        default=8, metadata=flag_help("ON similarity: val contexts per task in the fixed probe set; 0 leaves ON out.")
    )
    ablation_lengths: tuple[int, ...] = field(
        default=(), metadata=flag_help("Lester's ablation: prompt lengths to train for every task x `ablation_inits` (one seed).")
    )
    ablation_inits: tuple[str, ...] = field(default=(), metadata=flag_help("Lester's ablation: inits, e.g. [\"text\", \"random\"]."))
    spot_val_examples: int | None = field(
        default=None, metadata=flag_help("SPoT: each short run's val accuracy on a seeded subsample of at most this many (a smaller split whole; default: the task's `max_val_examples`).")
    )
    interpret: bool = field(
        default=False, metadata=flag_help("Interpretation stage: row importance, what the reading keeps, elicited descriptions (issue 21).")
    )
    interpret_tasks: tuple[str, ...] = field(
        default=(), metadata=flag_help("Interpretation stage: the tasks it reads (default: every task).")
    )
    interpret_seeds: tuple[int, ...] = field(
        default=(), metadata=flag_help("Interpretation stage: the seeds whose prompts it reads (default: every seed).")
    )
    interpret_examples: int | None = field(
        default=None, metadata=flag_help("Interpretation stage: score on a seeded subsample of N of each task's eval set (it costs 1 + 2P scorings a prompt; default: all).")
    )
    # the anchor trade-off (issue 21): accuracy against faithfulness as the anchor weight G grows
    anchor_weights: tuple[float, ...] = field(
        default=(), metadata=flag_help("Anchor sweep: weights G to train each of `anchor_tasks` at, G = 0 included if wanted (empty: off).")
    )
    anchor_tasks: tuple[str, ...] = field(default=(), metadata=flag_help("Anchor sweep: tasks to sweep (default: every task)."))
    anchor_epochs: int | None = field(default=None, metadata=flag_help("Anchor sweep: epochs per run (default: the task's own)."))
    anchor_max_train_examples: int | None = field(
        default=None, metadata=flag_help("Anchor sweep: train subsample per run (default: the task's own).")
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.tasks:
            raise ValueError("study key `tasks` is empty; list at least one of cb, rte, copa, wsc")
        for task in self.tasks:
            get_task(task)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"study key `tasks` lists a task twice: {list(self.tasks)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study key `seeds` must list distinct integers, got {list(self.seeds)}")
        if self.transfer_seed is not None and self.transfer_seed not in self.seeds:
            raise ValueError(f"study key `transfer_seed` = {self.transfer_seed} is not one of `seeds` {list(self.seeds)}")
        if self.top_k < 1:
            raise ValueError(f"study key `top_k` must be at least 1, got {self.top_k}")
        self._check_stage_keys()
        self._check_anchor_keys()
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise ValueError(f"unknown training key(s) {unknown}; valid keys: {', '.join(TRAIN_KEYS)}")
        for task, overrides in self.per_task.items():
            if task not in self.tasks:
                raise ValueError(f"[per_task.{task}] names a task that is not in `tasks` {list(self.tasks)}")
            bad = sorted(set(overrides) - set(PER_TASK_KEYS))
            if bad:
                raise ValueError(f"[per_task.{task}] cannot set {bad}; per-task keys: {', '.join(PER_TASK_KEYS)}")
        for task in self.tasks:
            try:
                load_train_task(task)  # a task without a train split is refused before anything trains
                self.train_config(task, self.seeds[0])
            except ValueError as e:  # TrainConfig names the CLI flag (--lr); name the TOML key (lr) instead
                where = f"[per_task.{task}]: " if task in self.per_task else ""
                raise ValueError(where + re.sub(r"--([a-z-]+)", lambda m: f"`{m.group(1).replace('-', '_')}`", str(e))) from None

    def _check_stage_keys(self) -> None:
        object.__setattr__(self, "ablation_lengths", tuple(self.ablation_lengths))
        object.__setattr__(self, "ablation_inits", tuple(self.ablation_inits))
        object.__setattr__(self, "interpret_tasks", tuple(self.interpret_tasks))
        object.__setattr__(self, "interpret_seeds", tuple(self.interpret_seeds))
        for key in ("spot_val_examples", "interpret_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"study key `{key}` must be at least 1 (leave it out for all), got {getattr(self, key)}")
        stray = [t for t in self.interpret_tasks if t not in self.tasks]
        if stray:
            raise ValueError(f"study key `interpret_tasks` names {stray}, not in `tasks` {list(self.tasks)}")
        stray = [s for s in self.interpret_seeds if s not in self.seeds]
        if stray:
            raise ValueError(f"study key `interpret_seeds` names {stray}, not in `seeds` {list(self.seeds)}")
        for key in ("spot_steps", "probe_examples"):
            if getattr(self, key) < 0:
                raise ValueError(f"study key `{key}` must be 0 (off) or more, got {getattr(self, key)}")
        if bool(self.ablation_lengths) != bool(self.ablation_inits):
            raise ValueError("study keys `ablation_lengths` and `ablation_inits` go together; set both or neither")
        if any(n < 1 for n in self.ablation_lengths):
            raise ValueError(f"study key `ablation_lengths` must list lengths >= 1, got {list(self.ablation_lengths)}")
        valid = [m.value for m in InitMethod if m is not InitMethod.PROMPT]
        bad = [i for i in self.ablation_inits if i not in valid]
        if bad:
            raise ValueError(f"study key `ablation_inits` has {bad}; choose from {', '.join(valid)}")

    def _check_anchor_keys(self) -> None:
        object.__setattr__(self, "anchor_weights", tuple(float(g) for g in self.anchor_weights))
        object.__setattr__(self, "anchor_tasks", tuple(self.anchor_tasks))
        if not self.anchor_weights:
            given = [k for k in ("anchor_tasks", "anchor_epochs", "anchor_max_train_examples") if getattr(self, k)]
            if given:
                raise ValueError(f"study key(s) {', '.join(f'`{k}`' for k in given)} need `anchor_weights`; list the weights G to sweep")
            return
        bad = [g for g in self.anchor_weights if not (math.isfinite(g) and g >= 0)]
        if bad:
            raise ValueError(f"study key `anchor_weights` must list finite numbers >= 0, got {bad}")
        if len(set(self.anchor_weights)) != len(self.anchor_weights):
            raise ValueError(f"study key `anchor_weights` lists a weight twice: {list(self.anchor_weights)}")
        outside = [t for t in self.anchor_tasks if t not in self.tasks]
        if outside:
            raise ValueError(f"study key `anchor_tasks` has {outside}, not in `tasks` {list(self.tasks)}; sweep tasks the study trains")
        if len(set(self.anchor_tasks)) != len(self.anchor_tasks):
            raise ValueError(f"study key `anchor_tasks` lists a task twice: {list(self.anchor_tasks)}")
        object.__setattr__(self, "anchor_tasks", self.anchor_tasks or self.tasks)
        for key in ("anchor_epochs", "anchor_max_train_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"study key `{key}` must be at least 1 (or left out for the task's own), got {getattr(self, key)}")

    @property
    def model(self) -> str:
        return self.train.get("model", DEFAULT_MODEL)

    @property
    def representative_seed(self) -> int:
        return self.seeds[0] if self.transfer_seed is None else self.transfer_seed

    def train_config(self, task: str, seed: int) -> TrainConfig:
        """A run's config: the shared training keys, then the task's own."""
        keys = {**self.train, **self.per_task.get(task, {})}
        return TrainConfig(task=task, seed=seed, **keys)

    def to_json(self) -> dict:
        study = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        study.update(tasks=list(self.tasks), seeds=list(self.seeds), ablation_lengths=list(self.ablation_lengths),
                     ablation_inits=list(self.ablation_inits), interpret_tasks=list(self.interpret_tasks),
                     interpret_seeds=list(self.interpret_seeds))
        study.update(anchor_weights=list(self.anchor_weights), anchor_tasks=list(self.anchor_tasks))
        study["per_task"] = {
            task: {k: v for k, v in self.train_config(task, self.seeds[0]).to_json().items() if k in overrides}
            for task, overrides in self.per_task.items()
        }
        shared = TrainConfig(task=self.tasks[0], seed=self.seeds[0], **self.train).to_json()
        return {**study, **{k: shared[k] for k in TRAIN_KEYS}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "study config") -> StudyConfig:
        """Build from flat TOML keys, checking each key's type.

        Raises:
            ValueError: unknown key, wrong type or invalid value; the message names the key and `source`.
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"train", "per_task"}
        data = dict(data)
        per_task = data.pop("per_task", {})
        if not isinstance(per_task, dict) or not all(isinstance(t, dict) for t in per_task.values()):
            raise ValueError(f"{source}: `per_task` must be tables like [per_task.rte], got {per_task!r}")
        if "max_eval_examples" in data or any("max_eval_examples" in t for t in per_task.values()):
            raise ValueError(
                f"{source}: key `max_eval_examples` is now `max_val_examples` (the same seeded random subsample of each "
                "val split, which every run reports on and the study scores); rename it"
            )
        unknown = sorted(set(data) - own - set(TRAIN_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(own | set(TRAIN_KEYS)))}")
        for key in ("tasks", "seeds"):
            if key not in data:
                raise ValueError(f"{source}: missing key `{key}`")
        hints = typing.get_type_hints(cls) | typing.get_type_hints(TrainConfig)
        for key, value in data.items():
            _check_type(key, value, hints[key], source)
        for task, overrides in per_task.items():
            for key, value in overrides.items():
                if key in hints and key in TRAIN_KEYS:
                    _check_type(key, value, hints[key], f"{source} [per_task.{task}]")
        kwargs = {k: v for k, v in data.items() if k in own}
        try:
            return cls(**kwargs, train={k: v for k, v in data.items() if k in TRAIN_KEYS}, per_task=per_task)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> StudyConfig:
        """Load a study config file.

        Raises:
            FileNotFoundError: no such file. ValueError: bad TOML or a bad key (file and key named).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(data, str(path))


def _check_type(key: str, value: Any, hint: Any, source: str) -> None:
    """Raise a ValueError naming `key` when a TOML value does not fit the field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    allowed = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is tuple and isinstance(value, list):
            inner = typing.get_args(kind)[0]
            fits = (int, float) if inner is float else inner  # [0, 0.1] is a list of floats, as `lr = 1` is a float
            if all(isinstance(v, fits) and not (inner in (int, float) and isinstance(v, bool)) for v in value):
                return
        elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        elif base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        elif isinstance(base, type) and issubclass(base, str) and isinstance(value, str):
            return
        elif base is bool and isinstance(value, bool):
            return
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{source}: key `{key}` must be {names}, got {value!r}")
