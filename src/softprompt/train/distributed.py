"""One prompt trained data-parallel across processes (`torchrun` or `accelerate launch`), gloo on CPU, NCCL on GPUs.

Every rank holds the frozen model and the same `[P, H]` prompt and walks the same batch order (one
seed). Each rank takes a contiguous share of every batch and backpropagates its share's mean loss
times its share of the batch's answer tokens; summing those gradients over ranks gives exactly the
gradient of the whole batch's mean loss, so N processes train the prompt one process would (up to
float rounding). Rank 0 alone writes the run folder (run.json, prompt, checkpoints: the loop's
`RunWriter(writes=is_main())`); every rank reads it, so a multi-node run needs the run folder on
storage all nodes share. With one process
(no `WORLD_SIZE` in the environment) every function here is the identity or a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from softprompt.data.batch import Batch, Encoded, train_batch


def init_from_env() -> int:
    """Join the process group that torchrun / accelerate launch describe (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    Returns:
        The world size (1 when not launched by either: nothing is initialised).
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return world_size()
    if torch.cuda.is_available():  # one GPU per rank: `--device auto` / `cuda` then means this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if dist.is_initialized():
        dist.barrier()


def share(items: list, rank_: int, world: int) -> list:
    """Rank `rank_`'s contiguous share of a batch: sizes differ by at most one, earlier ranks larger."""
    size, extra = divmod(len(items), world)
    start = rank_ * size + min(rank_, extra)
    return items[start : start + size + (rank_ < extra)]


def share_loss(
    loss_step: Callable[..., Tensor], backbone, prompt: Tensor, items: list[Encoded], pad_id: int
) -> tuple[Tensor, int]:
    """This rank's term of the batch's mean loss, and the tokens it ran.

    The term is the share's mean loss x (its answer tokens / the batch's), so the terms of all ranks
    sum to the whole batch's mean loss, and so do their gradients. One process: the batch's mean loss.
    """
    world = world_size()
    if world == 1:
        batch = train_batch(items, pad_id)  # tokens counted on the host, before the batch moves
        return loss_step(backbone, prompt, batch.to(backbone.device)), batch.num_tokens
    mine = share(items, rank(), world)
    if not mine:  # a batch smaller than the world: this rank adds a zero gradient
        return prompt.sum() * 0.0, 0
    batch: Batch = train_batch(mine, pad_id)
    answers = sum(len(item.choices[item.label]) for item in items)  # the batch's scored tokens (its loss averages over them)
    return loss_step(backbone, prompt, batch.to(backbone.device)) * (len(batch.targets) / answers), batch.num_tokens


def batch_loss(term: Tensor) -> Tensor:
    """The whole batch's mean loss on every rank (the sum of the ranks' terms), detached, not read.

    The caller reads it with the step's other values in one host sync.
    """
    if world_size() == 1:
        return term.detach()
    total = term.detach().clone()
    dist.all_reduce(total)
    return total


def sum_gradients(prompt: torch.nn.Parameter) -> None:
    """Sum the `[P, H]` prompt gradient over ranks: every rank then steps with the whole batch's gradient."""
    if world_size() > 1:
        dist.all_reduce(prompt.grad)
