"""Tiny training runs for tests: one TrainConfig on the fixture's CB rows, and a failure at the Nth loss step.

The fixture has 24 CB train rows: a dev slice of 4 leaves 20, so batch 4 is 5 optimizer steps an epoch.
"""

from __future__ import annotations

import pytest

import softprompt.train.loop as train_module
from softprompt.train.config import TrainConfig

TINY_TRAIN = dict(task="cb", min_dev_examples=4, batch_size=4, num_tokens=4, max_length=64, lr=0.3, device="cpu")


def tiny_config(**fields) -> TrainConfig:
    """TINY_TRAIN with `fields` on top (a file's own defaults, then a test's overrides)."""
    return TrainConfig(**{**TINY_TRAIN, **fields})


def fail_at_loss_step(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> None:
    """Make the `n`-th call of the training loss step (1-based, counted across epochs) raise `exc`."""
    calls = {"n": 0}
    real = train_module.loss_step

    def loss_step(*args):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args)

    monkeypatch.setattr(train_module, "loss_step", loss_step)
