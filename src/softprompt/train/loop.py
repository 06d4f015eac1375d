"""Prompt tuning: a readable loop that trains only the `[P, H]` prompt of a frozen model.

The protocol: train on `train` minus a stratified dev slice, early-stop on dev loss (patience 5),
keep the prompt with the best dev loss, report on the official `val` split. `early_stop_on=val`
reproduces the paper's protocol (which selects on the split it reports) and run.json says so.
"""

from __future__ import annotations

import hashlib
import random
import math
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from tqdm.auto import tqdm

from softprompt.backbones.loading import DEFAULT_MODEL, DTYPE_CHOICES, Backbone, load_backbone, tokenizer_identity
from softprompt.data.batch import Batch, bucketed_batches, encode
from softprompt.eval.scoring import metrics, score
from softprompt.eval.evaluate import evaluate
from softprompt.analysis.interpret import nearest_tokens_in_model
from softprompt.core.prompt import (
    InitMethod,
    embed_ids,
    embed_text,
    from_class_labels,
    from_embedded_text,
    from_prompt,
    from_sample_of_embeddings,
    random_uniform,
)
from softprompt.core.forward import logits_at
from softprompt.io.runs import (
    CHECKPOINT_FILE,
    PROMPT_FILE,
    CheckpointError,
    RUN_FILE,
    atomic_write_json,
    load_checkpoint,
    load_prompt,
    provenance,
    read_run,
    remove_temp_files,
    save_checkpoint,
    save_prompt,
)
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import DataError, Example, Task, get_task, load_examples
from softprompt.tasks.taskfile import data_files, split_name
from softprompt.train import distributed
from softprompt.flags import flag_help

# Data-parallel (torchrun): every rank trains the same prompt; rank 0 alone writes the run folder.
atomic_write_json, save_prompt, save_checkpoint, remove_temp_files = map(
    distributed.rank_zero_only, (atomic_write_json, save_prompt, save_checkpoint, remove_temp_files)
)

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RESUMABLE_CHANGES = ("checkpoint_every",)  # config fields a resumed run may change: none alters the result
COMMON_TOKENS = 5000  # Lester's vocab init samples the 5,000 most common tokens; BPE ids come roughly in frequency order


class EarlyStopSplit(str, Enum):
    DEV = "dev"  # a stratified slice held out of train (honest: val stays unseen)
    VAL = "val"  # the paper's protocol: select on the split that is reported


class OptimizerName(str, Enum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"  # Lester et al.'s choice (constant lr, no parameter scaling), from transformers


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good prompt is kept on disk."""


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
        default=None, metadata=flag_help("Report on a seeded random subsample of val of this size (a study passes its max_eval_examples).")
    )
    early_stop_on: EarlyStopSplit = field(default=EarlyStopSplit.DEV, metadata=flag_help("Split for early stopping."))
    max_length: int = field(default=256, metadata=flag_help("Longest input in tokens; longer contexts lose their start."))
    max_grad_norm: float | None = field(default=None, metadata=flag_help("Clip the prompt gradient to this norm."))
    eval_batch_size: int = field(default=32, metadata=flag_help("Most examples per forward when scoring."))
    seed: int = field(default=0, metadata=flag_help("Seed for init, data order and everything else random in training."))
    data_seed: int = field(default=0, metadata=flag_help("Seed for the dev split and train subsample (fixed across seeds)."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    dtype: str = field(
        default="auto", metadata=flag_help("Backbone weights: auto (bf16 on a CUDA GPU with bf16, else float32), float32, bfloat16, float16.")
    )
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

    def __post_init__(self) -> None:
        try:
            split_name(get_task(self.task), "train")  # raises with the valid names, or names the missing split
        except DataError as e:
            raise ValueError(f"--task {self.task}: {e}") from None
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

    def to_json(self) -> dict:
        return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    val: list[Example]


def make_splits(task: Task, config: TrainConfig, data_dir: str | Path | None) -> Splits:
    """train minus a stratified dev slice; the official val split; an optional stratified train subsample."""
    train = load_examples(task, "train", data_dir)
    val = load_examples(task, "val", data_dir)
    labels = [e.label for e in train]
    dev_size = max(config.min_dev_examples, round(config.dev_fraction * len(train)))
    if dev_size >= len(train):
        raise ValueError(f"{task.name} has {len(train)} train examples, too few for a dev slice of {dev_size}")
    train, dev = train_test_split(train, test_size=dev_size, stratify=labels, random_state=config.data_seed)
    val = val_subsample(val, config.max_val_examples, config.data_seed)
    if config.early_stop_on is EarlyStopSplit.VAL:
        train, dev = train + dev, val
    elif config.max_dev_examples is not None and config.max_dev_examples < len(dev):
        dev = _stratified(dev, config.max_dev_examples, config.data_seed, "--max-dev-examples")
    if config.max_train_examples is not None and config.max_train_examples < len(train):
        train = _stratified(train, config.max_train_examples, config.data_seed, "--max-train-examples")
    return Splits(list(train), list(dev), val)


def _stratified(examples: list[Example], size: int, seed: int, flag: str) -> list[Example]:
    """A stratified subsample of `size` examples (by label), the same for every training seed."""
    try:
        kept, _ = train_test_split(examples, train_size=size, stratify=[e.label for e in examples], random_state=seed)
    except ValueError as e:  # fewer examples than classes, or a class too rare to split
        raise ValueError(f"{flag} {size}: cannot draw a stratified subsample of {len(examples)} examples ({e}); give a larger number") from None
    return list(kept)


def val_subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """`size` examples of a val split drawn with `random.Random(seed)`, in file order (all of them when `size` is None or larger).

    The study's `max_eval_examples` and a run's `max_val_examples` both use it, so a run reports on the
    very examples its study scores.
    """
    if size is None or size >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]


def initial_prompt(backbone: Backbone, task: Task, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """The `[P, H]` starting prompt for `config.init`."""
    model, tokenizer, n = backbone.model, backbone.tokenizer, config.num_tokens
    if config.init is InitMethod.PROMPT:
        source = load_prompt_source(Path(config.init_from), hidden_size=backbone.hidden_size).prompt
        return from_prompt(source, n, backbone.hidden_size, f"--init-from {config.init_from}")
    if config.init is InitMethod.RANDOM:
        return random_uniform(n, backbone.hidden_size, generator)
    if config.init is InitMethod.TEXT:
        text = config.init_text or task.init_text
        return from_embedded_text(embed_text(model, tokenizer, text), n)
    special = set(tokenizer.all_special_ids)
    vocab = embed_ids(model, [i for i in range(min(COMMON_TOKENS, len(tokenizer))) if i not in special])
    if config.init is InitMethod.VOCAB:
        return from_sample_of_embeddings(vocab, n, generator)
    label_ids = list(dict.fromkeys(t for word in task.label_words for t in tokenizer(word, add_special_tokens=False)["input_ids"]))
    return from_class_labels(embed_ids(model, label_ids), vocab, n, generator)


def loss_step(backbone: Backbone, prompt: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy over the answer tokens of a batch (the prompt positions are never scored)."""
    logits = logits_at(backbone.model, prompt, batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
    return torch.nn.functional.cross_entropy(logits, batch.targets)


@dataclass
class Progress:
    """Where training stands: everything a checkpoint restores besides tensors (JSON in its header)."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch already trained (always at an optimizer step)
    step: int = 0  # optimizer steps so far
    epoch_loss: float = 0.0  # sum of the current epoch's batch losses so far
    best_loss: float | None = None  # best dev loss so far (None: no epoch evaluated yet)
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best dev loss
    best_dev: dict | None = None  # dev metrics of the best epoch's prompt (the one saved)
    stopped: bool = False  # early stopping or --max-steps ended training
    history: list[dict] = field(default_factory=list)
    dtype: str | None = None  # the weights' dtype the run trains in (resume refuses another; see check_resume_dtype)


def train(
    config: TrainConfig,
    out_dir: Path,
    backbone: Backbone | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Train a soft prompt and write `prompt.safetensors` (best by dev loss) and `run.json` into `out_dir`.

    A checkpoint (`checkpoint.safetensors`: prompt, optimizer state, RNG states, position in the
    epoch, early-stopping state) is written at every epoch end and every `checkpoint_every` steps.
    With `resume=True`, training continues from it; on CPU the result is bit-identical to an
    uninterrupted run. A finished run deletes its checkpoint: the folder keeps the prompt and run.json.

    Returns:
        The run record (also in run.json), with per-epoch history and final dev and val metrics.

    Raises:
        TrainingDiverged: NaN/inf loss or gradient (run.json gets status `diverged`; the last good
            prompt and checkpoint stay on disk).
        ValueError: `out_dir` already holds a run (without `resume`), or `resume` on a finished run,
            another config or changed data.
        OSError: a file cannot be written (the message names it; older files are left intact).
    """
    started = time.time()
    out_dir = Path(out_dir)
    task = get_task(config.task)
    data = data_fingerprint(task, data_dir)
    check_run_dir(out_dir, config, data, resume)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = backbone or load_backbone(config.model, config.device, config.dtype)
    if resume:
        check_resume_dtype(out_dir, backbone.dtype)
    splits = make_splits(task, config, data_dir)
    tokenizer, device, pad_id = backbone.tokenizer, backbone.device, backbone.tokenizer.pad_token_id
    train_items = [encode(tokenizer, e, config.max_length) for e in splits.train]
    dev_items = [encode(tokenizer, e, config.max_length) for e in splits.dev]
    val_items = [encode(tokenizer, e, config.max_length) for e in splits.val]

    prompt = torch.nn.Parameter(initial_prompt(backbone, task, config, generator).to(device))
    # Every init but random starts each row on a token's embedding: which one is what "persisted" is measured against.
    init_ids = None if config.init is InitMethod.RANDOM else nearest_tokens_in_model(backbone.model, prompt.detach(), 1)[1][:, 0].tolist()
    optimizer = make_optimizer(prompt, config)
    header = {"model": backbone.name, "task": task.name, "init": config.init.value, "seed": str(config.seed), "dtype": backbone.dtype,
              **tokenizer_identity(tokenizer)}
    checkpoint = out_dir / CHECKPOINT_FILE
    state = start_or_resume(out_dir, resume, prompt, optimizer, generator, header)
    state.dtype = backbone.dtype
    if config.snapshot_every and state.step == 0:
        save_snapshot(out_dir, prompt, header, state)
    data.update(train=len(train_items), dev=len(dev_items), val=len(val_items), early_stop_on=config.early_stop_on.value)
    record = {
        "status": "running",
        "task": task.name,
        "model": backbone.name,
        "dtype": backbone.dtype,  # the weights' (what --dtype auto resolved to); the prompt is always float32
        "config": config.to_json(),
        "init_ids": init_ids,
        "data": data,
        **({"task_notes": list(task.notes)} if task.notes else {}),  # defaults the task file left to softprompt
        "provenance": provenance(),
        "backbone": backbone.source,  # GGUF sha256 and quantisation, hub id (empty for a plain folder)
        "resumed_at_step": [*read_run(out_dir).get("resumed_at_step", []), state.step] if resume else [],
        "history": state.history,  # the same list `end_epoch` appends to
    }
    atomic_write_json(out_dir / RUN_FILE, record)

    while not state.stopped and state.epoch < config.epochs:
        epoch_rng = generator.get_state()  # the epoch's batch order is a function of this state
        batches = bucketed_batches(train_items, config.batch_size, generator)
        bar = tqdm(total=len(batches), initial=state.batch, desc=f"{task.name} epoch {state.epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        tokens, epoch_start, pending = 0, time.time(), None
        for i in range(state.batch, len(batches)):
            # data-parallel: this rank's share of the batch; the loss read is the whole batch's on every rank
            loss, num_tokens = distributed.share_loss(loss_step, backbone, prompt, [train_items[j] for j in batches[i]], pad_id)
            tokens += num_tokens  # counted on the host, before the batch moves
            value = read_step(record, out_dir, pending, distributed.batch_loss(loss))  # the one host sync of the step
            if not math.isfinite(value):
                _diverged(record, out_dir, f"loss is {value} at epoch {state.epoch + 1}, step {state.step + 1}")
            (loss / config.grad_accum).backward()
            state.epoch_loss += value
            bar.update()
            if (i + 1) % config.grad_accum != 0 and i + 1 != len(batches):
                continue
            pending = (optimizer_step(prompt, optimizer, config.max_grad_norm), f"epoch {state.epoch + 1}, step {state.step + 1}")
            state.step, state.batch = state.step + 1, i + 1
            bar.set_postfix(step=state.step, loss=f"{value:.3f}")
            if config.max_steps is not None and state.step >= config.max_steps:
                break
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < len(batches):
                pending = read_step(record, out_dir, pending)  # never checkpoint a step that went wrong
                save_training_checkpoint(checkpoint, prompt, optimizer, epoch_rng, state)
        read_step(record, out_dir, pending)
        bar.close()
        dev = metrics(score(backbone, prompt.detach(), dev_items, config.eval_batch_size))
        if not math.isfinite(dev["loss"]):
            _diverged(record, out_dir, f"dev loss is {dev['loss']} after epoch {state.epoch + 1}")
        improved = end_epoch(state, dev, config, tokens / max(time.time() - epoch_start, 1e-6))
        if progress:
            last = state.history[-1]
            tqdm.write(f"{task.name} epoch {state.epoch}: train loss {last['train_loss']:.4f}  dev loss {dev['loss']:.4f}  dev acc {dev['accuracy']:.1f}")
        if improved:
            save_prompt(out_dir / PROMPT_FILE, prompt, {**header, "epoch": str(state.epoch)})
        if config.snapshot_every and state.epoch % config.snapshot_every == 0:
            save_snapshot(out_dir, prompt, header, state)
        save_training_checkpoint(checkpoint, prompt, optimizer, generator.get_state(), state)
        atomic_write_json(out_dir / RUN_FILE, record)

    distributed.barrier()  # rank 0 has written the best prompt
    best, _ = load_prompt(out_dir / PROMPT_FILE)
    record["best_epoch"] = state.best_epoch
    # the saved prompt was scored on dev when it was best; checkpoints from before best_dev existed rescore it
    record["dev"] = state.best_dev or metrics(score(backbone, best.to(device), dev_items, config.eval_batch_size))
    record["val"] = evaluate(backbone, best.to(device), task, splits.val, config.max_length, config.eval_batch_size)
    record["steps"] = state.step
    record["wall_s"] = round(time.time() - started, 1)
    record["status"] = "done"
    atomic_write_json(out_dir / RUN_FILE, record)
    if distributed.is_main():
        checkpoint.unlink(missing_ok=True)  # a finished run is its prompt and record; nothing is left to resume
    return record


def start_or_resume(
    out_dir: Path, resume: bool, prompt: torch.nn.Parameter, optimizer: torch.optim.Optimizer, generator: torch.Generator, header: dict
) -> Progress:
    """Restore the last checkpoint when resuming and there is one; otherwise save the initial prompt.

    A run killed before its first checkpoint resumes from step 0, which is the same as starting over.
    """
    checkpoint = out_dir / CHECKPOINT_FILE
    if resume:
        remove_temp_files(out_dir)  # a kill mid-write leaves `.NAME.*.tmp`; the real files are whole
        if checkpoint.is_file():
            return restore_checkpoint(checkpoint, prompt, optimizer, generator)
    save_prompt(out_dir / PROMPT_FILE, prompt, header)  # the init, so a prompt file exists from the start
    return Progress()


def make_optimizer(prompt: torch.nn.Parameter, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or Adafactor as Lester et al. ran it: a constant lr, no relative step or parameter scaling."""
    if config.optimizer is OptimizerName.ADAFACTOR:
        from transformers.optimization import Adafactor

        return Adafactor([prompt], lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW([prompt], lr=config.lr, weight_decay=config.weight_decay)


SNAPSHOT_DIR = "snapshots"


def save_snapshot(out_dir: Path, prompt: Tensor, header: dict, state: Progress) -> None:
    """The prompt after `state.epoch` epochs (`state.step` steps), as snapshots/epoch-NNNN.safetensors (0: the init)."""
    save_prompt(out_dir / SNAPSHOT_DIR / f"epoch-{state.epoch:04d}.safetensors", prompt, {**header, "epoch": str(state.epoch), "step": str(state.step)})


STEP_FAULTS = {1: "gradient is not finite at {where}", 2: "the prompt became non-finite at {where}; lower --lr or set --max-grad-norm"}


def optimizer_step(prompt: torch.nn.Parameter, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> Tensor:
    """Clip and step; return the step's fault code on the device (0: fine, else a key of `STEP_FAULTS`).

    The code is not read here (that would sync the host with the device every step): `read_step`
    reads it with the next loss, and before anything is saved, so a bad step is never checkpointed.
    """
    distributed.sum_gradients(prompt)  # data-parallel: the whole batch's gradient on every rank
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([prompt], max_grad_norm)
    bad_grad = ~torch.isfinite(prompt.grad).all()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bad_prompt = ~torch.isfinite(prompt).all()
    return torch.where(bad_grad, 1, torch.where(bad_prompt, 2, 0))


def read_step(record: dict, out_dir: Path, pending: tuple[Tensor, str] | None, loss: Tensor | None = None):
    """One host read: the last optimizer step's fault code (`pending`: code, where) and `loss`, together.

    Returns:
        the loss as a float if given, else None (nothing pending any more).

    Raises:
        TrainingDiverged: the pending step's gradient or prompt was not finite.
    """
    values = [] if loss is None else [loss.detach().float()]
    if pending is not None:
        values.append(pending[0].float())
    if not values:
        return None
    read = torch.stack(values).tolist()
    if pending is not None and read[-1]:
        _diverged(record, out_dir, STEP_FAULTS[int(read[-1])].format(where=pending[1]))
    return read[0] if loss is not None else None


def end_epoch(state: Progress, dev: dict, config: TrainConfig, tokens_per_s: float) -> bool:
    """Record the epoch, update early stopping, move `state` to the next epoch; True if dev loss improved."""
    state.history.append(
        {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": state.epoch_loss / max(state.batch, 1),
            "dev_loss": dev["loss"],
            "dev_accuracy": dev["accuracy"],
            "tokens_per_s": tokens_per_s,
        }
    )
    state.epoch, state.batch, state.epoch_loss = state.epoch + 1, 0, 0.0
    improved = state.best_loss is None or dev["loss"] < state.best_loss
    if improved:
        state.best_loss, state.best_epoch, state.bad_epochs, state.best_dev = dev["loss"], state.epoch, 0, dev
    else:
        state.bad_epochs += 1
    # patience N: stop after N epochs in a row without a better dev loss (0: at the first one)
    state.stopped = (state.bad_epochs > 0 and state.bad_epochs >= config.patience) or (config.max_steps is not None and state.step >= config.max_steps)
    return improved


def save_training_checkpoint(
    path: Path, prompt: Tensor, optimizer: torch.optim.Optimizer, data_rng: Tensor, state: Progress
) -> None:
    """Prompt, AdamW moments, RNG states and `state`, as one safetensors file written atomically.

    `data_rng` is the data-order generator's state at the start of the epoch `state` is in, so a
    resume rebuilds that epoch's batch order and skips the `state.batch` batches already trained.
    """
    tensors = {"prompt": prompt.detach(), "rng.data_order": data_rng, "rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for key, value in optimizer.state_dict()["state"].get(0, {}).items():
        tensors[f"optimizer.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    save_checkpoint(path, tensors, asdict(state))


def restore_checkpoint(path: Path, prompt: torch.nn.Parameter, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> Progress:
    """Load a checkpoint into `prompt`, `optimizer` and the RNGs; return the saved `Progress`.

    Raises:
        CheckpointError: the file is missing, truncated, altered, pickled or for another prompt shape.
    """
    tensors, saved = load_checkpoint(path)
    if "prompt" not in tensors or tensors["prompt"].shape != prompt.shape:
        found = list(tensors["prompt"].shape) if "prompt" in tensors else None
        raise CheckpointError(f"{path}: prompt of shape {found}, expected {list(prompt.shape)}; it belongs to another run")
    with torch.no_grad():
        prompt.copy_(tensors["prompt"])
    moments = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    if moments:
        optimizer.load_state_dict({"state": {0: moments}, "param_groups": optimizer.state_dict()["param_groups"]})
    generator.set_state(tensors["rng.data_order"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    try:
        return Progress(**saved)
    except TypeError as e:
        raise CheckpointError(f"{path}: unexpected training state ({e}); was it written by another softprompt version?") from None


def data_fingerprint(task: Task, data_dir: str | Path | None) -> dict:
    """The data folder, the task file and the SHA-256 of the task's train and val files, for run.json and resume checks.

    A split read from several files hashes their bytes in order; a hub dataset (no local files) gets None.
    """
    sha, folder = {}, None
    for split in ("train", "val"):
        paths = [p for p in data_files(task, split, data_dir) if p.is_file()]
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.read_bytes())
        sha[f"{split}_sha256"] = digest.hexdigest() if paths else None
        folder = folder or (paths[0].resolve().parents[1 if task.folder else 0] if paths else None)
    return {"dir": str(folder) if folder else None, "task_file": str(task.source.resolve()), **sha}


def config_differences(saved: dict, config: TrainConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{field: (saved value, `config`'s value)} for every field of `config` a run's saved config sets otherwise.

    A field the saved config lacks (the run was made before the field existed) counts as its default,
    which is what that run did; `ignore` names fields that may differ.
    """
    defaults = {f.name: f.default.value if isinstance(f.default, Enum) else f.default for f in fields(TrainConfig) if f.default is not MISSING}
    wanted = config.to_json()
    out = {}
    for key in sorted(wanted):
        before = saved.get(key, defaults.get(key))
        if key not in ignore and before != wanted[key]:
            out[key] = (before, wanted[key])
    return out


def check_run_dir(out_dir: Path, config: TrainConfig, data: dict, resume: bool) -> None:
    """Refuse to overwrite a run, and to resume a finished run, another config or changed data.

    Raises:
        ValueError: the message says what differs and what to do.
        FileNotFoundError: `resume` on a folder without run.json.
    """
    if not resume:
        if (out_dir / RUN_FILE).exists():
            raise ValueError(
                f"{out_dir} already holds a run; continue it with `softprompt train --resume {out_dir}` "
                f"(library: resume=True), or choose another --out"
            )
        return
    record = read_run(out_dir)
    if record.get("status") == "done":
        raise ValueError(f"{out_dir} is a finished run (status done); nothing to resume. Train into another --out")
    changed = config_differences(record.get("config", {}), config, ignore=RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {saved!r} -> {current!r}" for k, (saved, current) in changed.items())
        raise ValueError(f"cannot resume {out_dir} with another config ({diffs}); resume with the run's own settings")
    old = record.get("data", {})
    for key in ("train_sha256", "val_sha256"):
        if old.get(key) != data[key]:
            raise ValueError(
                f"cannot resume {out_dir}: the {key.split('_')[0]} data in {data['dir']} changed since the run started "
                f"(sha256 {old.get(key)} -> {data[key]}); resume with the original data (--data-dir)"
            )


def check_resume_dtype(out_dir: Path, dtype: str) -> None:
    """Refuse to resume a run in another weight dtype than it started in (`auto` may resolve differently here).

    Raises:
        ValueError: naming both dtypes.
    """
    started = read_run(out_dir).get("dtype")
    if started is not None and started != dtype:
        raise ValueError(
            f"cannot resume {out_dir}: it was trained with {started} weights, and this backbone is {dtype}; "
            f"resume with --dtype {started}"
        )


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


def _diverged(record: dict, out_dir: Path, reason: str) -> None:
    record["status"] = "diverged"
    record["error"] = reason
    atomic_write_json(out_dir / RUN_FILE, record)
    raise TrainingDiverged(
        f"training stopped: {reason}; the last good prompt is kept in {out_dir / PROMPT_FILE} "
        f"and the last good checkpoint in {out_dir / CHECKPOINT_FILE}"
    )
