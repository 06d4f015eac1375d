"""A training checkpoint: the prompt, the optimizer's moments, the RNG states and where training stands.

One safetensors file (`checkpoint.safetensors`), written atomically at every epoch end and every
`checkpoint_every` steps; `Progress` rides in its header as JSON. A resume restores all of it, so on
CPU a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from softprompt.io.runs import CHECKPOINT_FILE, CheckpointError, RunWriter, load_checkpoint


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


def start_or_resume(
    writer: RunWriter, resume: bool, prompt: torch.nn.Parameter, optimizer: torch.optim.Optimizer, generator: torch.Generator, header: dict
) -> Progress:
    """Restore the last checkpoint when resuming and there is one; otherwise save the initial prompt.

    A run killed before its first checkpoint resumes from step 0, which is the same as starting over.
    """
    checkpoint = writer.folder / CHECKPOINT_FILE
    if resume:
        writer.cleanup()  # a kill mid-write leaves `.NAME.*.tmp`; the real files are whole
        if checkpoint.is_file():
            return restore_checkpoint(checkpoint, prompt, optimizer, generator)
    writer.save_prompt(prompt, header)  # the init, so a prompt file exists from the start
    return Progress()


def save_training_checkpoint(
    writer: RunWriter, prompt: Tensor, optimizer: torch.optim.Optimizer, data_rng: Tensor, state: Progress
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
    writer.save_checkpoint(tensors, asdict(state))


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
