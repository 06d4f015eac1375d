"""A run folder on disk: `prompt.safetensors` + `run.json`, written atomically, verified on load.

Every file softprompt writes goes to a temp file in the same folder and is renamed into place, so a
crash or a full disk never leaves a half-written file under the real name and never truncates the
old one. A prompt file carries its shape, model and a SHA-256 of its values in the safetensors
header; loading checks them. No pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

PROMPT_FILE = "prompt.safetensors"
RUN_FILE = "run.json"
PROMPT_KEY = "prompt"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

class PromptFileError(ValueError):
    """A prompt file is missing, truncated, altered, pickled or for another model; the message names it."""

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename.

    Raises:
        OSError: the folder is not writable or the disk is full; the message names `path`.
            An existing file at `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

def tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()

def save_prompt(path: Path, prompt: Tensor, metadata: dict[str, str] | None = None) -> None:
    """Save a `[P, H]` prompt as safetensors (fp32) with shape, checksum and `metadata` in the header."""
    prompt = prompt.detach().cpu().float().contiguous()
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header.update(num_tokens=str(prompt.shape[0]), hidden_size=str(prompt.shape[1]), sha256=tensor_sha256(prompt))
    atomic_write_bytes(Path(path), st_save({PROMPT_KEY: prompt}, metadata=header))

def prompt_path(path: Path) -> Path:
    path = Path(path)
    return path / PROMPT_FILE if path.is_dir() else path

def load_prompt(path: Path, hidden_size: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """Load and verify a prompt saved by `save_prompt`: (`[P, H]` fp32 tensor, header metadata).

    Args:
        path: a `prompt.safetensors` file, a run folder holding one, or a PEFT adapter folder.
        hidden_size: when given, the backbone's hidden size the prompt must match.

    Raises:
        PromptFileError: missing, pickled, truncated or altered file, or a hidden-size mismatch.
    """
    from softprompt.peft_adapter import is_adapter_dir, read_adapter  # lazy: peft_adapter imports this module

    if is_adapter_dir(path):  # a PEFT prompt-tuning adapter folder
        return read_adapter(path, hidden_size)
    path = prompt_path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise PromptFileError(f"{path}: refusing a pickle-based file ({path.suffix}); softprompt loads safetensors only")
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise PromptFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if PROMPT_KEY not in tensors:
        raise PromptFileError(f"{path}: no '{PROMPT_KEY}' tensor (found {sorted(tensors)})")
    prompt = tensors[PROMPT_KEY].float()
    if prompt.dim() != 2:
        raise PromptFileError(f"{path}: prompt must be [num_tokens, hidden], got shape {list(prompt.shape)}")
    if "sha256" in metadata and metadata["sha256"] != tensor_sha256(prompt):
        raise PromptFileError(f"{path}: checksum mismatch, the file was altered or damaged; retrain or restore it")
    if hidden_size is not None and prompt.shape[1] != hidden_size:
        model = metadata.get("model", "another model")
        raise PromptFileError(
            f"{path}: prompt hidden size {prompt.shape[1]} (trained on {model}) does not match the backbone's "
            f"hidden size {hidden_size}; evaluate it with the model it was trained on (--model)"
        )
    return prompt, metadata

def read_run(run_dir: Path) -> dict:
    """The run record of a run folder.

    Raises:
        FileNotFoundError: no run.json; ValueError: run.json is not valid JSON.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RUN_FILE} in {run_dir}; is it a softprompt run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

def is_done(run_dir: Path) -> bool:
    """True when the run finished (`status: done`) and its prompt file is there."""
    try:
        return read_run(run_dir).get("status") == "done" and (Path(run_dir) / PROMPT_FILE).is_file()
    except (FileNotFoundError, ValueError):
        return False

def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

def provenance() -> dict[str, Any]:
    """Versions, machine and git commit, for run.json."""
    import transformers

    import softprompt

    return {
        "softprompt": softprompt.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
