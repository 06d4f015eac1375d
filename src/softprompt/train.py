"""Prompt tuning: a readable loop that trains only the `[P, H]` prompt of a frozen model.

The protocol: train on `train` minus a stratified dev slice, early-stop on dev loss (patience 5),
keep the prompt with the best dev loss, report on the official `val` split. `early_stop_on=val`
reproduces the paper's protocol (which selects on the split it reports) and run.json says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from tqdm.auto import tqdm

from softprompt.backbone import DEFAULT_MODEL, Backbone, load_backbone
from softprompt.batch import Batch, Encoded, bucketed_batches, encode, train_batch
from softprompt.evaluate import metrics, score
from softprompt.prompt import (
    InitMethod,
    embed_ids,
    from_class_labels,
    from_embedded_text,
    from_sample_of_embeddings,
    logits_at,
    random_uniform,
)
from softprompt.runs import PROMPT_FILE, RUN_FILE, atomic_write_json, load_prompt, provenance, save_prompt
from softprompt.tasks import Example, Task, get_task, load_examples

COMMON_TOKENS = 5000  # Lester's vocab init samples the 5,000 most common tokens; BPE ids come roughly in frequency order


class EarlyStopSplit(str, Enum):
    DEV = "dev"  # a stratified slice held out of train (honest: val stays unseen)
    VAL = "val"  # the paper's protocol: select on the split that is reported


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good prompt is kept on disk."""


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(metadata=_help("SuperGLUE task: cb, rte, copa or wsc."))
    model: str = field(default=DEFAULT_MODEL, metadata=_help("Preset, local HF folder, .gguf file or hub id."))
    init: InitMethod = field(default=InitMethod.TEXT, metadata=_help("Prompt initialisation (Lester et al.)."))
    init_text: str | None = field(default=None, metadata=_help("Text for --init text; default: the task's good prompt."))
    num_tokens: int = field(default=20, metadata=_help("Prompt length P (virtual tokens)."))
    lr: float = field(default=0.03, metadata=_help("AdamW learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    batch_size: int = field(default=8, metadata=_help("Examples per forward."))
    grad_accum: int = field(default=1, metadata=_help("Forwards per optimizer step."))
    epochs: int = field(default=50, metadata=_help("Maximum epochs (paper: 50)."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps."))
    patience: int = field(default=5, metadata=_help("Early stopping: epochs without a better dev loss (paper: 5)."))
    max_train_examples: int | None = field(default=None, metadata=_help("Train on a stratified subsample of this size."))
    dev_fraction: float = field(default=0.1, metadata=_help("Share of train held out as the dev slice."))
    min_dev_examples: int = field(default=32, metadata=_help("Smallest dev slice."))
    early_stop_on: EarlyStopSplit = field(default=EarlyStopSplit.DEV, metadata=_help("Split for early stopping."))
    max_length: int = field(default=256, metadata=_help("Longest input in tokens; longer contexts lose their start."))
    max_grad_norm: float | None = field(default=None, metadata=_help("Clip the prompt gradient to this norm."))
    eval_batch_size: int = field(default=16, metadata=_help("Examples per forward when scoring."))
    seed: int = field(default=0, metadata=_help("Seed for init, data order and everything else random in training."))
    data_seed: int = field(default=0, metadata=_help("Seed for the dev split and train subsample (fixed across seeds)."))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))

    def __post_init__(self) -> None:
        get_task(self.task)  # raises with the valid names
        object.__setattr__(self, "init", InitMethod(self.init))
        object.__setattr__(self, "early_stop_on", EarlyStopSplit(self.early_stop_on))
        positive = ("num_tokens", "batch_size", "grad_accum", "epochs", "max_length", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.patience < 1:
            raise ValueError(f"--patience must be at least 1, got {self.patience}")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"--dev-fraction must be between 0 and 1, got {self.dev_fraction}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
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
    if config.early_stop_on is EarlyStopSplit.VAL:
        train, dev = train + dev, val
    if config.max_train_examples is not None and config.max_train_examples < len(train):
        train, _ = train_test_split(
            train, train_size=config.max_train_examples, stratify=[e.label for e in train], random_state=config.data_seed
        )
    return Splits(list(train), list(dev), val)


def initial_prompt(backbone: Backbone, task: Task, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """The `[P, H]` starting prompt for `config.init`."""
    model, tokenizer, n = backbone.model, backbone.tokenizer, config.num_tokens
    if config.init is InitMethod.RANDOM:
        return random_uniform(n, backbone.hidden_size, generator)
    special = set(tokenizer.all_special_ids)
    common = [i for i in range(min(COMMON_TOKENS, len(tokenizer))) if i not in special]
    vocab = embed_ids(model, common)
    if config.init is InitMethod.VOCAB:
        return from_sample_of_embeddings(vocab, n, generator)
    if config.init is InitMethod.CLASS_LABELS:
        label_ids = list(dict.fromkeys(t for word in task.label_words for t in tokenizer(word, add_special_tokens=False)["input_ids"]))
        return from_class_labels(embed_ids(model, label_ids), vocab, n, generator)
    text = config.init_text or task.init_text
    return from_embedded_text(embed_ids(model, tokenizer(text, add_special_tokens=False)["input_ids"]), n)


def loss_step(backbone: Backbone, prompt: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy over the answer tokens of a batch (the prompt positions are never scored)."""
    logits = logits_at(backbone.model, prompt, batch.input_ids, batch.attention_mask, batch.rows, batch.positions)
    return torch.nn.functional.cross_entropy(logits, batch.targets)


def train(
    config: TrainConfig,
    out_dir: Path,
    backbone: Backbone | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train a soft prompt and write `prompt.safetensors` (best by dev loss) and `run.json` into `out_dir`.

    Returns:
        The run record (also in run.json), with per-epoch history and final dev and val metrics.

    Raises:
        TrainingDiverged: NaN/inf loss or gradient (run.json gets status `diverged`; the last good
            prompt stays on disk).
    """
    started = time.time()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = backbone or load_backbone(config.model, config.device)
    task = get_task(config.task)
    splits = make_splits(task, config, data_dir)
    tokenizer, device, pad_id = backbone.tokenizer, backbone.device, backbone.tokenizer.pad_token_id
    train_items = [encode(tokenizer, e, config.max_length) for e in splits.train]
    dev_items = [encode(tokenizer, e, config.max_length) for e in splits.dev]
    val_items = [encode(tokenizer, e, config.max_length) for e in splits.val]

    prompt = torch.nn.Parameter(initial_prompt(backbone, task, config, generator).to(device))
    optimizer = torch.optim.AdamW([prompt], lr=config.lr, weight_decay=config.weight_decay)
    record = {
        "status": "running",
        "task": task.name,
        "model": backbone.name,
        "config": config.to_json(),
        "data": {"train": len(train_items), "dev": len(dev_items), "val": len(val_items), "early_stop_on": config.early_stop_on.value},
        "provenance": provenance(),
        "history": [],
    }
    header = {"model": backbone.name, "task": task.name, "init": config.init.value, "seed": str(config.seed)}
    save_prompt(out_dir / PROMPT_FILE, prompt, header)  # the init, so a prompt file exists from the start
    atomic_write_json(out_dir / RUN_FILE, record)

    best_loss, best_epoch, bad_epochs, step = float("inf"), -1, 0, 0
    for epoch in range(config.epochs):
        batches = bucketed_batches(train_items, config.batch_size, generator)
        bar = tqdm(batches, desc=f"{task.name} epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        epoch_loss, tokens, epoch_start = 0.0, 0, time.time()
        for i, indices in enumerate(bar):
            batch = train_batch([train_items[j] for j in indices], pad_id).to(device)
            loss = loss_step(backbone, prompt, batch)
            if not torch.isfinite(loss):
                _diverged(record, out_dir, f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            (loss / config.grad_accum).backward()
            epoch_loss += loss.item()
            tokens += batch.num_tokens
            if (i + 1) % config.grad_accum == 0 or i + 1 == len(batches):
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([prompt], config.max_grad_norm)
                if not torch.isfinite(prompt.grad).all():
                    _diverged(record, out_dir, f"gradient is not finite at epoch {epoch + 1}, step {step + 1}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(step=step, loss=f"{loss.item():.3f}")
            if config.max_steps is not None and step >= config.max_steps:
                break
        dev = metrics(score(backbone, prompt.detach(), dev_items, config.eval_batch_size))
        record["history"].append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": epoch_loss / (i + 1),
                "dev_loss": dev["loss"],
                "dev_accuracy": dev["accuracy"],
                "tokens_per_s": tokens / (time.time() - epoch_start),
            }
        )
        if progress:
            tqdm.write(f"{task.name} epoch {epoch + 1}: train loss {epoch_loss / (i + 1):.4f}  dev loss {dev['loss']:.4f}  dev acc {dev['accuracy']:.1f}")
        if dev["loss"] < best_loss:
            best_loss, best_epoch, bad_epochs = dev["loss"], epoch + 1, 0
            save_prompt(out_dir / PROMPT_FILE, prompt, {**header, "epoch": str(epoch + 1)})
        else:
            bad_epochs += 1
        atomic_write_json(out_dir / RUN_FILE, record)
        if bad_epochs >= config.patience or (config.max_steps is not None and step >= config.max_steps):
            break


    best, _ = load_prompt(out_dir / PROMPT_FILE)
    record["best_epoch"] = best_epoch
    record["dev"] = metrics(score(backbone, best.to(device), dev_items, config.eval_batch_size))
    record["val"] = metrics(score(backbone, best.to(device), val_items, config.eval_batch_size))
    record["steps"] = step
    record["wall_s"] = round(time.time() - started, 1)
    record["status"] = "done"
    atomic_write_json(out_dir / RUN_FILE, record)
    return record


def _diverged(record: dict, out_dir: Path, reason: str) -> None:
    record["status"] = "diverged"
    record["error"] = reason
    atomic_write_json(out_dir / RUN_FILE, record)
    raise TrainingDiverged(f"training stopped: {reason}; the last good prompt is kept in {out_dir / PROMPT_FILE}")
