"""Which examples a run trains on, selects on and reports on: one meaning per name.

- the dev slice: a stratified slice held out of train (`dev_fraction`, at least `min_dev_examples`),
  fixed by `data_seed`, so every training seed sees the same one;
- `max_train_examples`, `max_dev_examples`: stratified subsamples (by label) of train and of the dev slice;
- `max_val_examples`: a seeded random subsample of val, in file order (train and study score the same one).

The command line's `--limit` (evaluate, generate) is none of these: it takes the first N examples, for a quick look.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from sklearn.model_selection import train_test_split

from softprompt.tasks.registry import Example, Task, load_examples


class EarlyStopSplit(str, Enum):
    DEV = "dev"  # a stratified slice held out of train (honest: val stays unseen)
    VAL = "val"  # the paper's protocol: select on the split that is reported


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    val: list[Example]


def make_splits(
    task: Task,
    data_dir: str | Path | None,
    *,
    dev_fraction: float,
    min_dev_examples: int,
    data_seed: int,
    early_stop_on: EarlyStopSplit = EarlyStopSplit.DEV,
    max_train_examples: int | None = None,
    max_dev_examples: int | None = None,
    max_val_examples: int | None = None,
) -> Splits:
    """train minus a stratified dev slice; the official val split; optional subsamples of each.

    With `early_stop_on` VAL the dev slice goes back into train and val is the split selected on.

    Raises:
        ValueError: train is too small for the dev slice, or a subsample cannot be stratified (the flag is named).
        DataError: as `load_examples`.
    """
    train = load_examples(task, "train", data_dir)
    val = load_examples(task, "val", data_dir)
    labels = [e.label for e in train]
    dev_size = max(min_dev_examples, round(dev_fraction * len(train)))
    if dev_size >= len(train):
        raise ValueError(f"{task.name} has {len(train)} train examples, too few for a dev slice of {dev_size}")
    train, dev = train_test_split(train, test_size=dev_size, stratify=labels, random_state=data_seed)
    val = val_subsample(val, max_val_examples, data_seed)
    if early_stop_on is EarlyStopSplit.VAL:
        train, dev = train + dev, val
    elif max_dev_examples is not None and max_dev_examples < len(dev):
        dev = stratified_subsample(dev, max_dev_examples, data_seed, "--max-dev-examples")
    if max_train_examples is not None and max_train_examples < len(train):
        train = stratified_subsample(train, max_train_examples, data_seed, "--max-train-examples")
    return Splits(list(train), list(dev), val)


def stratified_subsample(examples: list[Example], size: int, seed: int, flag: str) -> list[Example]:
    """A stratified subsample of `size` examples (by label), the same for every training seed.

    Raises:
        ValueError: fewer examples than classes, or a class too rare to split (`flag` is named).
    """
    try:
        kept, _ = train_test_split(examples, train_size=size, stratify=[e.label for e in examples], random_state=seed)
    except ValueError as e:
        raise ValueError(f"{flag} {size}: cannot draw a stratified subsample of {len(examples)} examples ({e}); give a larger number") from None
    return list(kept)


def val_subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """`size` examples of a val split drawn with `random.Random(seed)`, in file order (all of them when `size` is None or larger).

    A run's `max_val_examples` and its study's evaluation both use it, so a run reports on the very
    examples its study scores.
    """
    if size is None or size >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]
