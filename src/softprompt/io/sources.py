"""One loader for every prompt source: run folders, PEFT adapters and their bare weight files.

`load_prompt_source(path)` takes whatever a user hands to `--prompt`:

- a finished run folder (`run.json` status `done` + `prompt.safetensors`),
- an imported run folder (`softprompt import-peft`, status `imported`),
- a PEFT prompt-tuning adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
  as PEFT's `save_pretrained` writes it),
- a `prompt.safetensors` file (softprompt's own), or an `adapter_model.safetensors` file (PEFT's).

Every source goes through the same checks: no pickle, a readable safetensors file, the checksum in
a softprompt header, a `[P, H]` shape, finite values and, given the backbone, its hidden size and its
tokenizer (a prompt trained under another vocabulary is refused). Every command that reads a prompt
(`evaluate`, `generate`, `serve`, `train --init prompt --init-from`) loads it here, so each one makes
every check. A folder that is neither a run nor an adapter, or a run that has not finished, is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from torch import Tensor

from softprompt.backbones.loading import Backbone, tokenizer_identity
from softprompt.io.peft import ADAPTER_CONFIG, ADAPTER_KEY, is_adapter_dir, read_adapter, read_adapter_file
from softprompt.io.runs import (
    PICKLE_SUFFIXES,
    PROMPT_FILE,
    PROMPT_KEY,
    RUN_FILE,
    PromptFileError,
    RunNotFinished,
    load_prompt,
    read_run,
    read_safetensors,
    refuse_pickle,
    tensor_sha256,
)

# Run statuses whose prompt is a result: `done` (trained to the end), `imported` (from PEFT).
USABLE_STATUSES = ("done", "imported")


class SourceKind(str, Enum):
    RUN = "run"  # a finished softprompt run folder
    IMPORTED_RUN = "imported-run"  # a run folder written by `softprompt import-peft`
    PEFT_ADAPTER = "peft-adapter"  # a PEFT prompt-tuning adapter folder
    PROMPT_FILE = "prompt-file"  # a bare prompt.safetensors
    ADAPTER_FILE = "adapter-file"  # a bare adapter_model.safetensors


@dataclass(frozen=True)
class LoadedPrompt:
    """A verified prompt and where it came from.

    Attributes:
        prompt: `[P, H]` fp32 tensor, finite.
        kind: what the path was.
        path: the path as given.
        metadata: the prompt file's header (or the adapter's, translated); strings only.
        run: the run.json record when the source was a run folder, else None.
    """

    prompt: Tensor
    kind: SourceKind
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    run: dict | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.prompt.shape[1]

    @property
    def task(self) -> str | None:
        return self.metadata.get("task") or (self.run or {}).get("task")

    @property
    def model(self) -> str | None:
        """The backbone the prompt was trained on, as recorded (a preset name, folder or hub id)."""
        return self.metadata.get("model") or (self.run or {}).get("model")

    @property
    def sha256(self) -> str:
        """SHA-256 of the fp32 values (the one `save_prompt` writes into the header)."""
        return self.metadata.get("sha256") or tensor_sha256(self.prompt)


def load_prompt_source(path: str | Path, hidden_size: int | None = None, backbone: Backbone | None = None) -> LoadedPrompt:
    """Load and verify a prompt from any source softprompt reads (see the module docstring).

    Args:
        path: a run folder, a PEFT adapter folder, a `prompt.safetensors` or an `adapter_model.safetensors`.
        hidden_size: when given, the hidden size the prompt must match (implied by `backbone`).
        backbone: when given, the backbone the prompt will run on: its hidden size and, where the
            prompt's header records one, its tokenizer must match.

    Returns:
        The `[P, H]` fp32 prompt with its metadata, run record and kind.

    Raises:
        FileNotFoundError: nothing at `path`, or a folder that is neither a run nor an adapter.
        RunNotFinished: a run folder whose status is not `done` or `imported`.
        PromptFileError: pickled, truncated, altered, non-finite, wrongly shaped, another hidden size,
            or trained under another tokenizer than `backbone`'s.
    """
    path = Path(path)
    hidden_size = backbone.hidden_size if backbone is not None else hidden_size
    loaded = _load_folder(path, hidden_size) if path.is_dir() else _load_file(path, hidden_size)
    if backbone is not None:
        check_tokenizer(loaded, tokenizer_identity(backbone.tokenizer), backbone.name)
    return loaded


def _load_folder(path: Path, hidden_size: int | None) -> LoadedPrompt:
    if (path / RUN_FILE).is_file():
        record = read_run(path)
        status = record.get("status")
        if status not in USABLE_STATUSES:
            raise RunNotFinished(
                f"{path} is not a finished run (status {status!r}); resume it with "
                f"`softprompt train --resume {path}`, or pass {path / PROMPT_FILE} to use its last best prompt anyway"
            )
        prompt, metadata = load_prompt(path / PROMPT_FILE, hidden_size)
        kind = SourceKind.RUN if status == "done" else SourceKind.IMPORTED_RUN
        return LoadedPrompt(prompt, kind, path, metadata, record)
    if is_adapter_dir(path):
        prompt, metadata = read_adapter(path, hidden_size)
        return LoadedPrompt(prompt, SourceKind.PEFT_ADAPTER, path, metadata)
    if (path / PROMPT_FILE).is_file():
        raise FileNotFoundError(
            f"no {RUN_FILE} in {path}, so it is not a run folder; pass {path / PROMPT_FILE} to use the prompt file alone"
        )
    raise FileNotFoundError(
        f"{path} holds no {RUN_FILE}, {PROMPT_FILE} or {ADAPTER_CONFIG}; give a softprompt run folder, "
        "a PEFT prompt-tuning adapter folder or a .safetensors prompt file"
    )


def _load_file(path: Path, hidden_size: int | None) -> LoadedPrompt:
    """A bare safetensors file, told apart by its tensor's name: `prompt` (ours) or `prompt_embeddings` (PEFT)."""
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, b"", PromptFileError)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source not found: {path}; give a run folder, a PEFT adapter folder or a .safetensors file")
    data = path.read_bytes()
    refuse_pickle(path, data, PromptFileError)
    tensors, _ = read_safetensors(path, data, PromptFileError)
    if PROMPT_KEY in tensors:
        prompt, metadata = load_prompt(path, hidden_size)
        return LoadedPrompt(prompt, SourceKind.PROMPT_FILE, path, metadata)
    if ADAPTER_KEY in tensors:
        prompt, metadata = read_adapter_file(path, hidden_size)
        return LoadedPrompt(prompt, SourceKind.ADAPTER_FILE, path, metadata)
    raise PromptFileError(
        f"{path}: no '{PROMPT_KEY}' tensor (a softprompt prompt file) or '{ADAPTER_KEY}' tensor (a PEFT "
        f"prompt-tuning adapter) in it; found {sorted(tensors)}"
    )


def check_tokenizer(loaded: LoadedPrompt, identity: dict[str, str], model: str) -> None:
    """Refuse a prompt trained under another vocabulary than the backbone's (when its header records one).

    A prompt's rows live in the embedding space of the vocabulary it was trained with; under another
    tokenizer the same text becomes other ids, and a hidden-size match alone does not catch it.

    Args:
        identity: the backbone's `tokenizer_identity` (vocab_size, tokenizer_sha256).
        model: the backbone's name, for the message.

    Raises:
        PromptFileError: naming both vocabulary sizes (or both tokenizer hashes) and the fix.
    """
    vocab_size, tokenizer_sha256 = int(identity["vocab_size"]), identity["tokenizer_sha256"]
    recorded_size, recorded_sha = loaded.metadata.get("vocab_size"), loaded.metadata.get("tokenizer_sha256")
    trained_on = loaded.model or "another model"
    if recorded_size is not None and int(recorded_size) != vocab_size:
        raise PromptFileError(
            f"{loaded.path}: the prompt was trained under a tokenizer of {recorded_size} tokens ({trained_on}), but "
            f"{model}'s has {vocab_size}; use it with the model it was trained on (--model {trained_on})"
        )
    if recorded_sha is not None and recorded_sha != tokenizer_sha256:
        raise PromptFileError(
            f"{loaded.path}: the prompt was trained under another tokenizer (sha256 {recorded_sha[:12]}..., {trained_on}) "
            f"than {model}'s ({tokenizer_sha256[:12]}..., same size {vocab_size}); use it with the model it was trained on (--model {trained_on})"
        )


def source_sha256(path: str | Path) -> str:
    """The checksum of the prompt a source holds (what `--init-from` names): a run remembers which version it started from."""
    return tensor_sha256(load_prompt_source(path).prompt)
