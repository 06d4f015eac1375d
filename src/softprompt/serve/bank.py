"""The prompt bank: every served prompt loaded once, verified, with its keys/values computed at load.

Entry 0 is always the bare backbone (no prompt, length 0), named like the model, so that
`/v1/completions` with `model` = the backbone's name runs it without a prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.core.forward import prompt_keys_values
from softprompt.io.runs import tensor_sha256
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import TASKS

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class UnknownPrompt(KeyError):
    """A request named a prompt the bank does not hold; the message lists the ones it does."""

    def __init__(self, name: object, valid: list[str]) -> None:
        super().__init__(name)
        self.name, self.valid = name, valid

    def __str__(self) -> str:
        return f"unknown prompt {self.name!r}; this server holds: {', '.join(self.valid)}"


@dataclass
class BankEntry:
    name: str
    task: str | None  # the task whose template formats raw-field inputs; None: text inputs only
    prompt: Tensor | None  # [P, H] fp32 on the backbone's device; None for the bare backbone
    checksum: str | None  # SHA-256 of the prompt's fp32 values, as in the prompt file's header
    source: str | None
    cache: object = field(default=None, repr=False)  # prompt_keys_values at batch 1, computed once

    @property
    def num_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "owned_by": "softprompt", "task": self.task,
                "num_tokens": self.num_tokens, "checksum": self.checksum}


def parse_prompt_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` of `--prompt` as (name, path).

    Raises:
        ValueError: no `=`, or a name that is empty or has characters outside `[A-Za-z0-9._:-]`.
    """
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"--prompt {spec!r} must be NAME=RUN_DIR_OR_PEFT_ADAPTER, e.g. --prompt cb=runs/cb")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--prompt name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ : - (starting alphanumeric)")
    return name, Path(path)


@torch.inference_mode()
def load_bank(backbone: Backbone, sources: list[tuple[str, Path]]) -> list[BankEntry]:
    """Load every `(name, path)` once and compute its keys/values; entry 0 is the bare backbone.

    Raises:
        ValueError: a duplicate name or a name equal to the backbone's; and as `load_prompt_source`
            (FileNotFoundError, RunNotFinished, PromptFileError).
    """
    bank = [BankEntry(backbone.name, None, None, None, None)]
    for name, path in sources:
        if name in (entry.name for entry in bank):
            raise ValueError(f"--prompt name {name!r} is given twice (or is the backbone's name); give each prompt its own name")
        loaded = load_prompt_source(path, backbone=backbone)  # checksum, no-pickle, finite, hidden size, tokenizer
        prompt = loaded.prompt.to(backbone.device)
        cache = prompt_keys_values(backbone.model, prompt)  # the server hands the bank its serving backbone (`scoring()`)
        task = loaded.task if loaded.task in TASKS else None
        bank.append(BankEntry(name, task, prompt, tensor_sha256(loaded.prompt), str(path), cache))
    return bank
