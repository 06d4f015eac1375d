"""Prompt tuning: a readable loop that trains only the `[P, H]` prompt of a frozen model.

The protocol: train on `train` minus a stratified dev slice, early-stop on dev loss (patience 5),
keep the prompt with the best dev loss, report on the official `val` split. `early_stop_on=val`
reproduces the paper's protocol (which selects on the split it reports) and run.json says so.

`train` reads top to bottom: `set_up` (checks, data, backbone, prompt, optimizer, run folder),
one `train_epoch` + dev scoring + `end_epoch` per epoch, then `finish` (the best prompt on val).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from softprompt.analysis.interpret import nearest_tokens_in_model
from softprompt.backbones.loading import Backbone, load_backbone, tokenizer_identity
from softprompt.core.forward import logits_at
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
from softprompt.data.batch import Batch, Encoded, bucketed_batches, encode
from softprompt.data.splits import make_splits
from softprompt.eval.scoring import metrics, score
from softprompt.eval.evaluate import evaluate
from softprompt.io.runs import (
    CHECKPOINT_FILE,
    PROMPT_FILE,
    SNAPSHOT_DIR,
    RunWriter,
    check_resume_dtype,
    check_run_dir,
    data_fingerprint,
    load_prompt,
    provenance,
    read_run,
)
from softprompt.io.sources import load_prompt_source, source_sha256
from softprompt.tasks.registry import Example, Task
from softprompt.train import distributed
from softprompt.train.anchor import anchor_embeddings, anchor_ids, anchor_penalty, faithfulness
from softprompt.train.checkpoint import Progress, save_training_checkpoint, start_or_resume
from softprompt.train.config import OptimizerName, TrainConfig, load_train_task

COMMON_TOKENS = 5000  # Lester's vocab init samples the 5,000 most common tokens; BPE ids come roughly in frequency order


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good prompt is kept on disk."""


@dataclass
class TrainingRun:
    """What `set_up` makes and the loop works on: the backbone, the encoded splits, the prompt and its optimizer."""

    task: Task
    backbone: Backbone
    writer: RunWriter  # writes the run folder on rank 0 only
    train_items: list[Encoded]
    dev_items: list[Encoded]
    val: list[Example]  # the val examples, for `evaluate` at the end (MultiRC groups answers by question)
    prompt: torch.nn.Parameter  # [P, H] fp32
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the data order's
    header: dict  # the prompt file's metadata
    state: Progress
    record: dict  # run.json
    anchor: Tensor | None = None  # [P, H] on the prompt's device, only with --anchor-weight > 0


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
        ValueError: an unknown task or one without a train split; `out_dir` already holds a run
            (without `resume`), or `resume` on a finished run, another config or changed data.
        OSError: a file cannot be written (the message names it; older files are left intact).
    """
    started = time.time()
    run = set_up(config, Path(out_dir), backbone, data_dir, resume)
    state = run.state
    while not state.stopped and state.epoch < config.epochs:
        tokens_per_s = train_epoch(run, config, progress)
        dev = metrics(score(run.backbone, run.prompt.detach(), run.dev_items, config.eval_batch_size))
        if not math.isfinite(dev["loss"]):
            _diverged(run.record, run.writer, f"dev loss is {dev['loss']} after epoch {state.epoch + 1}")
        improved = end_epoch(state, dev, tokens_per_s, config.patience, config.max_steps)
        if progress:
            last = state.history[-1]
            tqdm.write(f"{run.task.name} epoch {state.epoch}: train loss {last['train_loss']:.4f}  dev loss {dev['loss']:.4f}  dev acc {dev['accuracy']:.1f}")
        save_epoch(run, improved, config.snapshot_every)
    return finish(run, config.max_length, config.eval_batch_size, started)


# --- set up ---------------------------------------------------------------------------------------


def set_up(config: TrainConfig, out_dir: Path, backbone: Backbone | None, data_dir: str | Path | None, resume: bool) -> TrainingRun:
    """Check the task and the run folder, load the backbone and the data, make the prompt and write run.json."""
    task = load_train_task(config.task)
    data = data_fingerprint(task, data_dir)
    check_run_dir(out_dir, config, data, resume)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = backbone or load_backbone(config.model, config.device, config.dtype, config.attention)
    if resume:
        check_resume_dtype(out_dir, backbone.dtype, backbone.attention)
    splits = make_splits(task, data_dir, **config.split_options())
    train_items, dev_items = ([encode(backbone.tokenizer, e, config.max_length) for e in examples] for examples in (splits.train, splits.dev))

    prompt = torch.nn.Parameter(initial_prompt(backbone, task, config, generator).to(backbone.device))
    # Every init but random starts each row on a token's embedding: which one is what "persisted" is measured against.
    init_ids = None if config.init is InitMethod.RANDOM else nearest_tokens_in_model(backbone.model, prompt.detach(), 1)[1][:, 0].tolist()
    optimizer = make_optimizer(prompt, config.optimizer, config.lr, config.weight_decay)
    header = {"model": backbone.name, "task": task.name, "init": config.init.value, "seed": str(config.seed), "dtype": backbone.dtype,
              "attention": backbone.attention, "cpu": backbone.hardware()["model"], **tokenizer_identity(backbone.tokenizer)}
    writer = RunWriter(out_dir, writes=distributed.is_main())  # data-parallel: every rank trains, rank 0 alone writes
    state = start_or_resume(writer, resume, prompt, optimizer, generator, header)
    state.dtype = backbone.dtype
    if config.snapshot_every and state.step == 0:
        save_snapshot(writer, prompt, header, state)
    data.update(train=len(train_items), dev=len(dev_items), val=len(splits.val), early_stop_on=config.early_stop_on.value)
    record = start_record(config, task, backbone, data, init_ids, state, out_dir if resume else None)
    anchor, record["anchor"] = make_anchor(backbone, task, config)
    writer.write_record(record)
    return TrainingRun(task, backbone, writer, train_items, dev_items, splits.val, prompt, optimizer, generator, header, state, record, anchor)


def make_anchor(backbone: Backbone, task: Task, config: TrainConfig) -> tuple[Tensor | None, dict]:
    """The anchor `[P, H]` on the backbone's device (None at weight 0: no penalty), and run.json's `anchor`.

    The anchor's token ids are recorded at every weight, so `faithfulness` is measured at G = 0 too.
    """
    text = config.anchor_text or config.init_text or task.init_text
    info = {"text": text, "weight": config.anchor_weight, "ids": anchor_ids(backbone.tokenizer, text, config.num_tokens)}
    if config.anchor_weight == 0:
        return None, info
    return anchor_embeddings(backbone.model, backbone.tokenizer, text, config.num_tokens).to(backbone.device), info


def start_record(
    config: TrainConfig, task: Task, backbone: Backbone, data: dict, init_ids: list[int] | None, state: Progress, resumed: Path | None
) -> dict:
    """run.json as training starts (status `running`); `resumed` is the run folder when resuming, else None."""
    return {
        "status": "running",
        "task": task.name,
        "model": backbone.name,
        "dtype": backbone.dtype,  # the weights' (what --dtype auto resolved to); the prompt is always float32
        "hardware": backbone.hardware(),  # the CPU/GPU, its bf16 capability, dtype, attention, fp32 judging
        "config": config.to_json(),
        "init_ids": init_ids,
        "data": data,
        **({"task_notes": list(task.notes)} if task.notes else {}),  # defaults the task file left to softprompt
        "provenance": provenance(),
        "backbone": backbone.source,  # GGUF sha256 and quantisation, hub id (empty for a plain folder)
        "resumed_at_step": [*read_run(resumed).get("resumed_at_step", []), state.step] if resumed else [],
        "history": state.history,  # the same list `end_epoch` appends to
        # --init-from: which version of the source prompt this run started from (a study re-trains a run whose source changed)
        **({"init_from_sha256": source_sha256(config.init_from)} if config.init_from else {}),
    }


def initial_prompt(backbone: Backbone, task: Task, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """The `[P, H]` starting prompt for `config.init`."""
    model, tokenizer, n = backbone.model, backbone.tokenizer, config.num_tokens
    if config.init is InitMethod.PROMPT:
        source = load_prompt_source(Path(config.init_from), backbone=backbone).prompt  # every check, the tokenizer's too
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


def make_optimizer(prompt: torch.nn.Parameter, name: OptimizerName, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or Adafactor as Lester et al. ran it: a constant lr, no relative step or parameter scaling."""
    if name is OptimizerName.ADAFACTOR:
        from transformers.optimization import Adafactor

        return Adafactor([prompt], lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW([prompt], lr=lr, weight_decay=weight_decay)


# --- the loop -------------------------------------------------------------------------------------


def train_epoch(run: TrainingRun, config: TrainConfig, progress: bool) -> float:
    """Train from `run.state`'s place in the epoch to its end (or to `--max-steps`); return tokens per second.

    Checkpoints every `checkpoint_every` steps inside the epoch; the epoch-end checkpoint is `save_epoch`'s.
    """
    state, pad_id = run.state, run.backbone.tokenizer.pad_token_id
    epoch_rng = run.generator.get_state()  # the epoch's batch order is a function of this state
    batches = bucketed_batches(run.train_items, config.batch_size, run.generator)
    bar = tqdm(total=len(batches), initial=state.batch, desc=f"{run.task.name} epoch {state.epoch + 1}/{config.epochs}", disable=not progress, leave=False)
    tokens, epoch_start, pending = 0, time.time(), None
    for i in range(state.batch, len(batches)):
        # data-parallel: this rank's share of the batch; the loss read is the whole batch's on every rank
        loss, num_tokens = step_loss(run, [run.train_items[j] for j in batches[i]], pad_id, config.anchor_weight)
        tokens += num_tokens  # counted on the host, before the batch moves
        value = read_step(run.record, run.writer, pending, distributed.batch_loss(loss))  # the one host sync of the step
        if not math.isfinite(value):
            _diverged(run.record, run.writer, f"loss is {value} at epoch {state.epoch + 1}, step {state.step + 1}")
        (loss / config.grad_accum).backward()
        state.epoch_loss += value
        bar.update()
        if (i + 1) % config.grad_accum != 0 and i + 1 != len(batches):
            continue
        pending = (optimizer_step(run.prompt, run.optimizer, config.max_grad_norm), f"epoch {state.epoch + 1}, step {state.step + 1}")
        state.step, state.batch = state.step + 1, i + 1
        bar.set_postfix(step=state.step, loss=f"{value:.3f}")
        if config.max_steps is not None and state.step >= config.max_steps:
            break
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < len(batches):
            pending = read_step(run.record, run.writer, pending)  # never checkpoint a step that went wrong
            save_training_checkpoint(run.writer, run.prompt, run.optimizer, epoch_rng, state)
    read_step(run.record, run.writer, pending)
    bar.close()
    return tokens / max(time.time() - epoch_start, 1e-6)


def step_loss(run: TrainingRun, items: list[Encoded], pad_id: int, anchor_weight: float) -> tuple[Tensor, int]:
    """This rank's term of the step's loss: the task loss (`loss_step`) plus, with an anchor, its penalty.

    Data-parallel ranks each add 1/world of the penalty, so the summed gradients carry it once. The
    history's `train_loss` is this sum; dev and val losses are the task loss alone.
    """
    loss, num_tokens = distributed.share_loss(loss_step, run.backbone, run.prompt, items, pad_id)
    if run.anchor is not None:
        loss = loss + anchor_penalty(run.prompt, run.anchor, anchor_weight) / distributed.world_size()
    return loss, num_tokens


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


def read_step(record: dict, writer: RunWriter, pending: tuple[Tensor, str] | None, loss: Tensor | None = None):
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
        _diverged(record, writer, STEP_FAULTS[int(read[-1])].format(where=pending[1]))
    return read[0] if loss is not None else None


def end_epoch(state: Progress, dev: dict, tokens_per_s: float, patience: int, max_steps: int | None) -> bool:
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
    state.stopped = (state.bad_epochs > 0 and state.bad_epochs >= patience) or (max_steps is not None and state.step >= max_steps)
    return improved


def save_epoch(run: TrainingRun, improved: bool, snapshot_every: int | None) -> None:
    """After an epoch: the prompt if dev loss improved, a snapshot every `snapshot_every` epochs, the checkpoint, run.json."""
    state = run.state
    if improved:
        run.writer.save_prompt(run.prompt, {**run.header, "epoch": str(state.epoch)})
    if snapshot_every and state.epoch % snapshot_every == 0:
        save_snapshot(run.writer, run.prompt, run.header, state)
    save_training_checkpoint(run.writer, run.prompt, run.optimizer, run.generator.get_state(), state)
    run.writer.write_record(run.record)


def save_snapshot(writer: RunWriter, prompt: Tensor, header: dict, state: Progress) -> None:
    """The prompt after `state.epoch` epochs (`state.step` steps), as snapshots/epoch-NNNN.safetensors (0: the init)."""
    writer.save_prompt(prompt, {**header, "epoch": str(state.epoch), "step": str(state.step)}, f"{SNAPSHOT_DIR}/epoch-{state.epoch:04d}.safetensors")


# --- finish ---------------------------------------------------------------------------------------


def finish(run: TrainingRun, max_length: int, eval_batch_size: int, started: float) -> dict:
    """Score the best prompt on val, write the finished run.json and drop the checkpoint; return the record."""
    distributed.barrier()  # rank 0 has written the best prompt
    best, _ = load_prompt(run.writer.folder / PROMPT_FILE)
    best, record, state = best.to(run.backbone.device), run.record, run.state
    record["best_epoch"] = state.best_epoch
    # the saved prompt was scored on dev when it was best; checkpoints from before best_dev existed rescore it
    record["dev"] = state.best_dev or metrics(score(run.backbone, best, run.dev_items, eval_batch_size))
    record["val"] = evaluate(run.backbone, best, run.task, run.val, max_length, eval_batch_size)
    record["faithfulness"] = faithfulness(best, record["anchor"]["ids"], run.backbone.model)  # rows on their anchor token
    record["steps"] = state.step
    record["wall_s"] = round(time.time() - started, 1)
    record["status"] = "done"
    run.writer.write_record(record)
    run.writer.remove_checkpoint()  # a finished run is its prompt and record; nothing is left to resume
    return record


def _diverged(record: dict, writer: RunWriter, reason: str) -> None:
    record["status"] = "diverged"
    record["error"] = reason
    writer.write_record(record)
    raise TrainingDiverged(
        f"training stopped: {reason}; the last good prompt is kept in {writer.folder / PROMPT_FILE} "
        f"and the last good checkpoint in {writer.folder / CHECKPOINT_FILE}"
    )
