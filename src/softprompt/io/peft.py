"""PEFT's prompt-tuning adapter format: export a run's prompt, import a prompt PEFT trained.

A PEFT prompt-tuning adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`,
whose single tensor `prompt_embeddings` is the `[num_virtual_tokens, token_dim]` prompt (peft
`utils/save_and_load.py`). PEFT prepends it to the input embeddings of the unmodified model, as
softprompt does, so the same tensor gives the same logits in both (tests/test_peft.py checks it).

softprompt's own fields go in the safetensors header, never in `adapter_config.json`: PEFT warns
about every key its `PromptTuningConfig` does not know ("Unexpected keyword arguments ... upgrade
PEFT"). Adapters exported before that kept `softprompt_model` in the config; they are still read.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save as st_save
from torch import Tensor

from softprompt.backbones.loading import PRESETS
from softprompt.io.runs import (
    PICKLE_SUFFIXES,
    PROMPT_FILE,
    RUN_FILE,
    PromptFileError,
    atomic_write_bytes,
    atomic_write_json,
    check_prompt_tensor,
    load_prompt,
    provenance,
    read_prompt_tensor,
    read_run,
    save_prompt,
    tensor_sha256,
)
from softprompt.tasks.registry import TASKS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_KEY = "prompt_embeddings"
# softprompt init -> PEFT's PromptTuningInit; class labels start from vocabulary embeddings too.
PEFT_INIT = {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "class-labels": "SAMPLE_VOCAB", "random": "RANDOM"}
SOFTPROMPT_INIT = {"TEXT": "text", "SAMPLE_VOCAB": "vocab", "RANDOM": "random"}
# Our own field, in the weights' safetensors header (in adapter_config.json before): softprompt's model
# name (a preset such as smollm2-135m-instruct), while base_model_name_or_path holds what PEFT's
# AutoPeftModel can resolve (the hub id).
SOFTPROMPT_MODEL_FIELD = "softprompt_model"


def is_adapter_dir(path: Path) -> bool:
    """True for a folder holding a PEFT adapter config and no softprompt prompt file."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / PROMPT_FILE).is_file()


def adapter_config(prompt: Tensor, metadata: dict[str, str], run: dict) -> dict:
    """The `adapter_config.json` PEFT's `PromptTuningConfig` reads back, for a `[P, H]` prompt."""
    init = PEFT_INIT.get(metadata.get("init", ""), "RANDOM")
    config = run.get("config", {})
    model = _model_name(metadata, run)
    base = PRESETS[model].hub_id if model in PRESETS else model  # what AutoPeftModel can resolve
    init_text = None
    if init == "TEXT":
        init_text = config.get("init_text") or _task_init_text(metadata.get("task") or run.get("task"))
        if init_text is None:
            init = "RANDOM"  # PEFT refuses TEXT without the text
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "base_model_name_or_path": base,
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": init_text,
        # PEFT requires a tokenizer with TEXT init (it is only read when training from scratch).
        "tokenizer_name_or_path": base if init == "TEXT" else None,
        "inference_mode": True,
    }


def _model_name(metadata: dict[str, str], run: dict) -> str | None:
    """softprompt's name for the prompt's model: the prompt file's header, else the run's record."""
    return metadata.get("model") or run.get("model")


def _task_init_text(task_name: str | None) -> str | None:
    task = TASKS.get(task_name or "")
    return task.init_text if task else None


def export_peft(run_dir: Path, out_dir: Path) -> dict:
    """Write a run's prompt as a PEFT prompt-tuning adapter into `out_dir`.

    Args:
        run_dir: a softprompt run folder (or a `prompt.safetensors` file).
        out_dir: the adapter folder to write (`adapter_model.safetensors`, `adapter_config.json`).

    Returns:
        The adapter config written. softprompt's model name (a preset, read back by `evaluate --prompt`)
        goes in the weights' header as `softprompt_model`, where PEFT does not look.

    Raises:
        PromptFileError: the run's prompt is missing or damaged.
    """
    prompt, metadata = load_prompt(run_dir)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = read_run(run_dir) if (run_dir / RUN_FILE).is_file() else {}  # a bare prompt file has none
    config = adapter_config(prompt, metadata, run)
    model = _model_name(metadata, run)
    header = {"format": "pt", **({SOFTPROMPT_MODEL_FIELD: str(model)} if model else {})}
    weights = st_save({ADAPTER_KEY: prompt.contiguous()}, metadata=header)
    atomic_write_bytes(out_dir / ADAPTER_WEIGHTS, weights)
    atomic_write_json(out_dir / ADAPTER_CONFIG, config)
    return config


def read_adapter(adapter_dir: Path, hidden_size: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """The prompt of a PEFT prompt-tuning adapter folder: (`[P, H]` fp32, metadata like `load_prompt`'s).

    Raises:
        PromptFileError: not a causal-LM prompt-tuning adapter, pickled or unreadable weights, a
            shape that disagrees with the config, NaN/inf values, or a hidden-size mismatch with the backbone.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir / ADAPTER_CONFIG)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = [p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f"; found {pickled}: refusing pickle-based files, re-save with safe_serialization=True" if pickled else ""
        raise PromptFileError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}{hint}")
    return _adapter_prompt(path, config, hidden_size)


def read_adapter_file(path: Path, hidden_size: int | None = None) -> tuple[Tensor, dict[str, str]]:
    """The prompt of a bare `adapter_model.safetensors`; its folder's `adapter_config.json` is checked if present.

    Raises:
        PromptFileError: as `read_adapter`.
    """
    path = Path(path)
    config_path = path.parent / ADAPTER_CONFIG
    config = read_adapter_config(config_path) if config_path.is_file() else {}
    return _adapter_prompt(path, config, hidden_size)


def read_adapter_config(config_path: Path) -> dict:
    """A PEFT adapter config, refused unless it is a causal-LM PROMPT_TUNING one.

    Raises:
        PromptFileError: unreadable JSON, another PEFT method, or an encoder-decoder adapter.
    """
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PromptFileError(f"{config_path}: not a readable adapter config ({e})") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PromptFileError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; softprompt reads PROMPT_TUNING adapters only"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise PromptFileError(
            f"{config_path}: num_transformer_submodules={config['num_transformer_submodules']} (an encoder-decoder "
            "adapter); softprompt reads causal-LM adapters (1)"
        )
    return config


def _adapter_prompt(path: Path, config: dict, hidden_size: int | None) -> tuple[Tensor, dict[str, str]]:
    """Read, check and describe the `prompt_embeddings` tensor of a PEFT weights file."""
    prompt, header = read_prompt_tensor(path, ADAPTER_KEY, "; is it a prompt-tuning adapter?")
    expected = [config.get("num_virtual_tokens", prompt.shape[0]), config.get("token_dim", prompt.shape[-1])]
    if prompt.dim() != 2 or list(prompt.shape) != expected:
        raise PromptFileError(f"{path}: {ADAPTER_KEY} has shape {list(prompt.shape)}, the config says {expected}")
    # the header (exports today), the config (older exports), else PEFT's own base model name
    model = (header or {}).get(SOFTPROMPT_MODEL_FIELD) or config.get(SOFTPROMPT_MODEL_FIELD) or config.get("base_model_name_or_path")
    check_prompt_tensor(path, prompt, hidden_size, model)
    metadata = {"source": "peft", "init": SOFTPROMPT_INIT.get(str(config.get("prompt_tuning_init")), "random")}
    if model:
        metadata["model"] = str(model)
    if config.get("base_model_name_or_path"):
        metadata["base_model_name_or_path"] = str(config["base_model_name_or_path"])
    metadata["sha256"] = tensor_sha256(prompt)
    return prompt, metadata


def import_peft(adapter_dir: Path, run_dir: Path) -> Path:
    """Turn a PEFT prompt-tuning adapter into a softprompt run folder (`prompt.safetensors` + `run.json`).

    Returns:
        The prompt file written.

    Raises:
        PromptFileError: see `read_adapter`.
    """
    prompt, metadata = read_adapter(adapter_dir)
    run_dir = Path(run_dir)
    save_prompt(run_dir / PROMPT_FILE, prompt, metadata)
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    record = {
        "status": "imported",
        "source": str(Path(adapter_dir).resolve()),
        "model": metadata.get("model"),
        "peft_config": config,
        "provenance": provenance(),
    }
    atomic_write_json(run_dir / RUN_FILE, record)
    return run_dir / PROMPT_FILE
