"""Test factories: tiny random backbones built from a config, and a preset's tokenizer alone (nothing is downloaded).

They live with the tests, not in `softprompt`: no code in `src/` builds a random model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from softprompt.backbones.loading import (
    DEFAULT_MODEL,
    PRESETS,
    Backbone,
    cache_root,
    check_pad_token,
    freeze,
    model_folder,
    preset_gguf_path,
)


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer alone: from the cached copy of a preset, else from its GGUF file once (then cached)."""
    if name not in PRESETS:
        source, gguf_file = model_folder(name)
        return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    for folder in (cache_root() / "models" / name, cache_root() / "tokenizers" / name):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    gguf = preset_gguf_path(PRESETS[name])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # ~1 min for Gemma 3's 262k vocabulary
    folder = cache_root() / "tokenizers" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def model_from_config(
    config_dict: dict, tokenizer: PreTrainedTokenizerBase, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Backbone:
    """A tiny random backbone built from a config (nothing is downloaded).

    The weights are drawn in fp32 and then cast, so one seed gives the same model in every dtype.
    """
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype)
    check_pad_token(tokenizer, f"random-{config.model_type}")
    return Backbone(freeze(model), tokenizer, f"random-{config.model_type}", torch.device("cpu"))
