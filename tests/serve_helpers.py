"""What the serve tests share: a tiny backbone, a bank of three prompts of different lengths and sources."""

from __future__ import annotations

from pathlib import Path

import torch

from softprompt.io.peft import export_peft
from softprompt.io.runs import atomic_write_json, save_prompt
from softprompt.serve.app import create_app
from softprompt.serve.bank import load_bank
from softprompt.serve.config import ServeConfig
from softprompt.serve.server import ServerThread

PROMPT_LENGTHS = {"cb": 2, "copa": 5, "plain": 9}


def write_sources(folder: Path, hidden: int = 16) -> dict[str, Path]:
    """A finished run folder (task cb), a prompt file (task copa) and a PEFT adapter (no task)."""
    generator = torch.Generator().manual_seed(0)
    prompts = {name: torch.randn(n, hidden, generator=generator) for name, n in PROMPT_LENGTHS.items()}
    run = folder / "cb-run"
    save_prompt(run / "prompt.safetensors", prompts["cb"], {"task": "cb"})
    atomic_write_json(run / "run.json", {"status": "done", "task": "cb"})
    save_prompt(folder / "copa.safetensors", prompts["copa"], {"task": "copa"})
    save_prompt(folder / "plain-run" / "prompt.safetensors", prompts["plain"])
    export_peft(folder / "plain-run", folder / "plain-adapter")
    return {"cb": run, "copa": folder / "copa.safetensors", "plain": folder / "plain-adapter"}


def start(backbone, bank, run=None, **config) -> ServerThread:
    """The app on a free port; `run` replaces what the model thread runs (hand-made scores)."""
    config = ServeConfig(port=0, **config)
    return ServerThread(create_app(backbone, bank, config, run), config)


def bank_for(backbone, sources: dict[str, Path]):
    return load_bank(backbone, list(sources.items()))
