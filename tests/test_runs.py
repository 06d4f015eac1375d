"""Prompt files and run folders: exact round trip, and a clear error for every way a file goes bad."""

from __future__ import annotations

import json
import os

import pytest
import torch

from softprompt.io.runs import (
    PROMPT_FILE,
    RUN_FILE,
    PromptFileError,
    atomic_write_bytes,
    atomic_write_json,
    is_done,
    load_prompt,
    read_run,
    save_prompt,
)


@pytest.fixture
def saved(tmp_path):
    prompt = torch.arange(12, dtype=torch.float32).view(3, 4) / 7
    save_prompt(tmp_path / PROMPT_FILE, prompt, {"model": "tiny-llama", "task": "cb"})
    return tmp_path / PROMPT_FILE, prompt


def test_round_trip_is_exact_with_metadata(saved, tmp_path):
    path, prompt = saved
    loaded, metadata = load_prompt(path, hidden_size=4)
    assert torch.equal(loaded, prompt) and loaded.dtype == torch.float32
    assert metadata["model"] == "tiny-llama" and metadata["task"] == "cb"
    assert metadata["num_tokens"] == "3" and metadata["hidden_size"] == "4"
    assert torch.equal(load_prompt(tmp_path)[0], prompt)  # a run folder works too
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPT_FILE]  # no temp file left behind


def test_save_takes_a_parameter_in_another_dtype(tmp_path):
    prompt = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    save_prompt(tmp_path / PROMPT_FILE, prompt)
    loaded, _ = load_prompt(tmp_path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.ones(2, 3))


def test_hidden_size_mismatch_names_both_sizes(saved):
    path, _ = saved
    with pytest.raises(PromptFileError, match=r"prompt hidden size 4 \(trained on tiny-llama\) does not match the backbone's hidden size 576"):
        load_prompt(path, hidden_size=576)


def test_garbage_file(tmp_path):
    path = tmp_path / PROMPT_FILE
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(PromptFileError, match="not a readable safetensors file"):
        load_prompt(path)


def test_prompt_must_be_two_dimensional(tmp_path):
    from safetensors.torch import save_file

    save_file({"prompt": torch.zeros(2, 3, 4)}, tmp_path / PROMPT_FILE)
    with pytest.raises(PromptFileError, match=r"must be \[num_tokens, hidden\], got shape \[2, 3, 4\]"):
        load_prompt(tmp_path)


def test_file_without_prompt_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2, 3)}, tmp_path / PROMPT_FILE)
    with pytest.raises(PromptFileError, match=r"no 'prompt' tensor \(found \['weights'\]\)"):
        load_prompt(tmp_path)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"status": "done"})
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        atomic_write_json(path, {"status": object()})  # not JSON-serializable: fails before any byte is written
    assert json.loads(path.read_text()) == {"status": "done"}
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(OSError, match=r"cannot write .*a-file/run\.json"):
        atomic_write_bytes(blocked / "run.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run.json"]


def test_atomic_write_gives_the_usual_file_mode_and_keeps_an_existing_one(tmp_path):
    old_umask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.json", b"{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
        assert os.umask(0o027) == 0o027  # the umask is left as it was
        kept = tmp_path / "kept.json"
        kept.write_bytes(b"[]")
        kept.chmod(0o604)
        atomic_write_bytes(kept, b"{}")
        assert kept.stat().st_mode & 0o777 == 0o604 and kept.read_bytes() == b"{}"
    finally:
        os.umask(old_umask)


def test_read_run_and_is_done(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run.json in .*; is it a softprompt run folder"):
        read_run(tmp_path)
    assert not is_done(tmp_path)
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json: not valid JSON"):
        read_run(tmp_path)
    assert not is_done(tmp_path)
    atomic_write_json(tmp_path / RUN_FILE, {"status": "done"})
    assert not is_done(tmp_path)  # no prompt file yet
    save_prompt(tmp_path / PROMPT_FILE, torch.zeros(1, 2))
    assert is_done(tmp_path)
    (tmp_path / RUN_FILE).write_text('{"status": "do')  # truncated by hand
    assert not is_done(tmp_path)
    atomic_write_json(tmp_path / RUN_FILE, {"status": "diverged"})
    assert not is_done(tmp_path)
