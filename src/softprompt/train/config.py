"""TrainConfig: every choice of a training run, validated in `__post_init__` without I/O.

The dataclass is the schema: `softprompt train`'s flags and their `--help` are derived from it, a
study's TOML keys are its fields, and run.json records it (`to_json`), so `train --resume` rebuilds
it (`config_from_run`). Whether `task` names a task that can be trained on needs its file and is
checked where the task is loaded (`load_train_task`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from softprompt.backbones.fastpath import ATTENTION_HELP, DTYPE_HELP
from softprompt.backbones.loading import DEFAULT_MODEL, DTYPE_CHOICES
from softprompt.core.prompt import InitMethod
from softprompt.data.splits import EarlyStopSplit
from softprompt.flags import flag_help
from softprompt.io.runs import RUN_FILE, read_run
from softprompt.tasks.registry import DataError, Task, get_task
from softprompt.tasks.taskfile import split_name
from softprompt.train.anchor import check_anchor

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class OptimizerName(str, Enum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"  # Lester et al.'s choice (constant lr, no parameter scaling), from transformers


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(metadata=flag_help("Built-in task (cb, rte, copa, wsc, wic, multirc, boolq) or the path of a task file (lm-eval YAML)."))
    model: str = field(default=DEFAULT_MODEL, metadata=flag_help("Preset, local HF folder, .gguf file or hub id."))
    init: InitMethod = field(default=InitMethod.TEXT, metadata=flag_help("Prompt initialisation (Lester et al.)."))
    init_text: str | None = field(default=None, metadata=flag_help("Text for --init text; default: the task's good prompt."))
    num_tokens: int = field(default=20, metadata=flag_help("Prompt length P (virtual tokens)."))
    lr: float = field(default=0.03, metadata=flag_help("AdamW learning rate."))
    weight_decay: float = field(default=0.0, metadata=flag_help("AdamW weight decay."))
    batch_size: int = field(default=8, metadata=flag_help("Examples per forward."))
    grad_accum: int = field(default=1, metadata=flag_help("Forwards per optimizer step."))
    epochs: int = field(default=50, metadata=flag_help("Maximum epochs (paper: 50)."))
    max_steps: int | None = field(default=None, metadata=flag_help("Stop after this many optimizer steps."))
    patience: int = field(default=5, metadata=flag_help("Early stopping: epochs without a better dev loss (paper: 5)."))
    max_train_examples: int | None = field(default=None, metadata=flag_help("Train on a stratified subsample of this size."))
    dev_fraction: float = field(default=0.1, metadata=flag_help("Share of train held out as the dev slice."))
    min_dev_examples: int = field(default=32, metadata=flag_help("Smallest dev slice."))
    max_dev_examples: int | None = field(
        default=None, metadata=flag_help("Score a stratified subsample of the dev slice of this size each epoch (still held out of train).")
    )
    max_val_examples: int | None = field(
        default=None, metadata=flag_help("Report on a seeded random subsample of val of this size, in file order (drawn with --data-seed; a study scores the same examples).")
    )
    early_stop_on: EarlyStopSplit = field(default=EarlyStopSplit.DEV, metadata=flag_help("Split for early stopping."))
    max_length: int = field(default=256, metadata=flag_help("Longest input in tokens; longer contexts lose their start."))
    max_grad_norm: float | None = field(default=None, metadata=flag_help("Clip the prompt gradient to this norm."))
    eval_batch_size: int = field(default=32, metadata=flag_help("Most examples per forward when scoring."))
    seed: int = field(default=0, metadata=flag_help("Seed for init, data order and everything else random in training."))
    data_seed: int = field(default=0, metadata=flag_help("Seed for the dev split and train subsample (fixed across seeds)."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    dtype: str = field(default="auto", metadata=flag_help(DTYPE_HELP))
    attention: str = field(default="auto", metadata=flag_help(ATTENTION_HELP))
    checkpoint_every: int | None = field(
        default=None, metadata=flag_help("Also checkpoint every N optimizer steps (a checkpoint is always written at each epoch end).")
    )
    init_from: str | None = field(
        default=None, metadata=flag_help("For --init prompt: the run folder, prompt file or PEFT adapter whose prompt starts this one (SPoT).")
    )
    optimizer: OptimizerName = field(default=OptimizerName.ADAMW, metadata=flag_help("adamw, or adafactor (Lester et al.; constant --lr)."))
    snapshot_every: int | None = field(
        default=None, metadata=flag_help("Save the prompt every N epochs (and the init) under snapshots/, to follow its drift.")
    )
    anchor_weight: float = field(
        default=0.0, metadata=flag_help("G: add G * mean over rows ||p_i - e_i||^2 to the loss, e the anchor text's embeddings (0: no anchor).")
    )
    anchor_text: str | None = field(
        default=None,
        metadata=flag_help("Text each row is pulled toward, repeated or cut to --num-tokens rows as the text init does; default: the init text."),
    )

    def __post_init__(self) -> None:
        for name, kind in (("init", InitMethod), ("early_stop_on", EarlyStopSplit), ("optimizer", OptimizerName)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                valid = ", ".join(m.value for m in kind)
                raise ValueError(f"--{name.replace('_', '-')} must be one of {valid}, got {getattr(self, name)!r}") from None
        positive = ("num_tokens", "batch_size", "grad_accum", "epochs", "max_length", "eval_batch_size", "min_dev_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("seed", "data_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 2**32 - 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r} is not a dtype; use one of {', '.join(DTYPE_CHOICES)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"--device {self.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        for name in ("max_steps", "max_train_examples", "max_dev_examples", "max_val_examples", "checkpoint_every", "snapshot_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"--patience must be >= 0, got {self.patience}")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"--dev-fraction must be between 0 and 1, got {self.dev_fraction}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if (self.init is InitMethod.PROMPT) != (self.init_from is not None):
            raise ValueError(
                f"--init-from goes with --init prompt (got --init {self.init.value}, --init-from {self.init_from!r}); "
                "give both to start from another prompt, or neither"
            )
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("--init-text is empty; give some text or leave it out for the task's good prompt")
        check_anchor(self.anchor_weight, self.anchor_text)

    def to_json(self) -> dict:
        return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}

    def split_options(self) -> dict:
        """The keyword arguments of `make_splits` this config sets."""
        keys = ("dev_fraction", "min_dev_examples", "data_seed", "early_stop_on", "max_train_examples", "max_dev_examples", "max_val_examples")
        return {key: getattr(self, key) for key in keys}


def load_train_task(name: str) -> Task:
    """The task `--task name` names, refused unless it has a train split.

    Raises:
        ValueError: an unknown name (listing the valid ones), or a task without a train split (naming the key).
    """
    try:
        task = get_task(name)
        split_name(task, "train")
    except DataError as e:
        raise ValueError(f"--task {name}: {e}") from None
    return task


def config_from_run(run_dir: Path) -> TrainConfig:
    """The TrainConfig recorded in a run folder's run.json (for `train --resume`).

    Raises:
        FileNotFoundError: no run.json; ValueError: run.json has no valid config.
    """
    record = read_run(run_dir)
    try:
        return TrainConfig(**record["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{Path(run_dir) / RUN_FILE}: no valid training config ({e}); was it written by softprompt train?") from None
