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
import secrets
import stat
import subprocess
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from softprompt.tasks.registry import Task
from softprompt.tasks.taskfile import data_files

PROMPT_FILE = "prompt.safetensors"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
SNAPSHOT_DIR = "snapshots"
RESUMABLE_CHANGES = ("checkpoint_every",)  # config fields a resumed run may change: none alters the result
PROMPT_KEY = "prompt"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# torch.save writes a zip archive ("PK\x03\x04"); a bare pickle starts with PROTO 2..5 ("\x80\x02").
# A safetensors file starts with its header's length (8 bytes, little-endian) and then "{", and that
# length may begin with the same bytes, so the "{" at offset 8 tells them apart.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class PromptFileError(ValueError):
    """A prompt file is missing, truncated, altered, pickled or for another model; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, altered or pickled; the message names it."""


class RunNotFinished(ValueError):
    """A run folder whose run.json status is not `done`: its prompt is not a result."""


def refuse_pickle(path: Path, data: bytes, error: type[ValueError]) -> None:
    """Raise `error` when `path` is pickle-based, by its suffix or by its first bytes.

    A torch.save file renamed to `.safetensors` is caught by its magic bytes; it is never unpickled.
    """
    if path.suffix in PICKLE_SUFFIXES or (data.startswith(PICKLE_MAGIC) and data[8:9] != b"{"):
        raise error(
            f"{path}: refusing a pickle-based file (torch.save / pickle format); loading it could run "
            f"arbitrary code. softprompt loads safetensors only: convert it with safetensors.torch.save_file"
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename.

    The temp file is created like any new file (0666 less the umask; `tempfile.mkstemp`'s 0600 would
    hide runs and reports from everyone else); one that replaces a file takes over its mode.

    Raises:
        OSError: the folder is not writable or the disk is full; the message names `path`.
            An existing file at `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    try:
        if path.exists():
            os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; the previous file (if any) is unchanged") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files (`.NAME.*.tmp`) a kill left behind mid-write; return what was removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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

def read_safetensors(path: Path, data: bytes, error: type[ValueError]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of safetensors bytes, both from `data`.

    Both come from the same bytes: opening `path` a second time could read a newer file that was
    renamed into place in between, whose header would not match these tensors.
    """
    try:
        tensors = st_load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, header.get("__metadata__") or {}


def read_prompt_tensor(path: Path, key: str, hint: str = "") -> tuple[Tensor, dict[str, str]]:
    """(the float32 tensor `key`, header metadata) of a safetensors prompt file, refusing pickle.

    Raises:
        PromptFileError: a pickle, an unreadable file, or no `key` tensor (`hint` says what the file should be).
    """
    data = path.read_bytes()
    refuse_pickle(path, data, PromptFileError)
    tensors, metadata = read_safetensors(path, data, PromptFileError)
    if key not in tensors:
        raise PromptFileError(f"{path}: no '{key}' tensor (found {sorted(tensors)}){hint}")
    return tensors[key].float(), metadata


def prompt_path(path: Path) -> Path:
    path = Path(path)
    return path / PROMPT_FILE if path.is_dir() else path

def check_prompt_tensor(path: Path, prompt: Tensor, hidden_size: int | None, trained_on: str | None) -> None:
    """Refuse a prompt that is not `[P, H]`, holds NaN/inf, or does not fit the backbone's hidden size.

    Raises:
        PromptFileError: the message names `path`, the bad value and the fix.
    """
    if prompt.dim() != 2 or prompt.shape[0] == 0:
        raise PromptFileError(f"{path}: prompt must be [num_tokens, hidden], got shape {list(prompt.shape)} (num_tokens >= 1)")
    if not bool(prompt.isfinite().all()):
        bad = (~prompt.isfinite()).any(dim=1).nonzero().flatten().tolist()
        raise PromptFileError(
            f"{path}: the prompt holds NaN or inf values (rows {bad[:10]}{' ...' if len(bad) > 10 else ''}); every score "
            "would be NaN. Retrain it (a lower --lr or --max-grad-norm keeps training finite) or use another prompt file"
        )
    if hidden_size is not None and prompt.shape[1] != hidden_size:
        raise PromptFileError(
            f"{path}: prompt hidden size {prompt.shape[1]} (trained on {trained_on or 'another model'}) does not match "
            f"the backbone's hidden size {hidden_size}; evaluate it with the model it was trained on (--model)"
        )


def load_prompt(path: Path, hidden_size: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """Load and verify a prompt saved by `save_prompt`: (`[P, H]` fp32 tensor, header metadata).

    For any other source (PEFT adapters, imported runs) use `softprompt.io.sources.load_prompt_source`.

    Args:
        path: a `prompt.safetensors` file or a folder holding one.
        hidden_size: when given, the backbone's hidden size the prompt must match.

    Raises:
        PromptFileError: missing, pickled, truncated, altered or non-finite file, or a hidden-size mismatch.
    """
    path = prompt_path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, b"", PromptFileError)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    prompt, metadata = read_prompt_tensor(path, PROMPT_KEY)
    if "sha256" in metadata and metadata["sha256"] != tensor_sha256(prompt):
        raise PromptFileError(f"{path}: checksum mismatch, the file was altered or damaged; retrain or restore it")
    check_prompt_tensor(path, prompt, hidden_size, metadata.get("model"))
    return prompt, metadata

def _digest(tensors: dict[str, Tensor], text: str) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes, and `text`."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(text.encode())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict) -> None:
    """Write tensors (safetensors) and a JSON-able `state` (in the header) as one file, atomically.

    One file and one rename: a kill at any moment leaves either the old checkpoint or the new one.
    The header carries a SHA-256 over tensors and state, checked by `load_checkpoint`.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(state, allow_nan=False)
    header = {"state": text, "sha256": _digest(tensors, text), "format": "softprompt-checkpoint-1"}
    atomic_write_bytes(Path(path), st_save(tensors, metadata=header))


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Load and verify a checkpoint written by `save_checkpoint`: (tensors, state).

    Raises:
        CheckpointError: missing, pickled, truncated or altered file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    refuse_pickle(path, data, CheckpointError)
    tensors, header = read_safetensors(path, data, CheckpointError)
    if "state" not in header or "sha256" not in header:
        raise CheckpointError(f"{path}: not a softprompt checkpoint (no state or checksum in its header)")
    if _digest(tensors, header["state"]) != header["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch, the file was altered or damaged; delete it to restart the run")
    try:
        return tensors, json.loads(header["state"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the state in its header is not valid JSON ({e})") from None


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
        "torch_threads": torch.get_num_threads(),  # CPU reductions may round differently with another count
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,  # data-parallel ranks
        "git_commit": git_commit(),
    }


@dataclass(frozen=True)
class RunWriter:
    """Writes one run folder, or nothing: with data-parallel training every rank trains, rank 0 alone writes.

    Attributes:
        folder: the run folder.
        writes: whether this process writes it (False: every method is a no-op).
    """

    folder: Path
    writes: bool = True

    def save_prompt(self, prompt: Tensor, metadata: dict[str, str], name: str = PROMPT_FILE) -> None:
        """`prompt` as `folder/name` (a path under the folder, e.g. snapshots/epoch-0001.safetensors)."""
        if self.writes:
            save_prompt(self.folder / name, prompt, metadata)

    def save_checkpoint(self, tensors: dict[str, Tensor], state: dict) -> None:
        if self.writes:
            save_checkpoint(self.folder / CHECKPOINT_FILE, tensors, state)

    def write_record(self, record: dict) -> None:
        """run.json."""
        if self.writes:
            atomic_write_json(self.folder / RUN_FILE, record)

    def cleanup(self) -> None:
        """Delete the temp files a kill left mid-write (the real files are whole)."""
        if self.writes:
            remove_temp_files(self.folder)

    def remove_checkpoint(self) -> None:
        """A finished run is its prompt and record; nothing is left to resume."""
        if self.writes:
            (self.folder / CHECKPOINT_FILE).unlink(missing_ok=True)


# --- the run-folder policy: what may be written over or resumed --------------------------------


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


def config_differences(saved: dict, config: Any, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{field: (saved value, `config`'s value)} for every field of `config` a run's saved config sets otherwise.

    `config` is a config dataclass with `to_json()` (a TrainConfig). A field the saved config lacks
    (the run was made before the field existed) counts as its default, which is what that run did;
    `ignore` names fields that may differ.
    """
    defaults = {f.name: f.default.value if isinstance(f.default, Enum) else f.default for f in fields(config) if f.default is not MISSING}
    wanted = config.to_json()
    out = {}
    for key in sorted(wanted):
        before = saved.get(key, defaults.get(key))
        if key not in ignore and before != wanted[key]:
            out[key] = (before, wanted[key])
    return out


def check_run_dir(out_dir: Path, config: Any, data: dict, resume: bool) -> None:
    """Refuse to overwrite a run, and to resume a finished run, another config or changed data.

    `config` is the run's config dataclass (a TrainConfig); `data` its `data_fingerprint`.

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


def check_resume_dtype(out_dir: Path, dtype: str, attention: str | None = None) -> None:
    """Refuse to resume a run in another weight dtype or attention kernel than it started in (`auto` may resolve differently here).

    Raises:
        ValueError: naming both dtypes (or both attention implementations).
    """
    record = read_run(out_dir)
    started = record.get("dtype")
    if started is not None and started != dtype:
        raise ValueError(
            f"cannot resume {out_dir}: it was trained with {started} weights, and this backbone is {dtype}; "
            f"resume with --dtype {started}"
        )
    kernel = record.get("hardware", {}).get("attention")
    if attention is not None and kernel is not None and kernel != attention:
        raise ValueError(
            f"cannot resume {out_dir}: it was trained with {kernel} attention, and this backbone runs {attention}; "
            f"resume with --attention {kernel}"
        )
