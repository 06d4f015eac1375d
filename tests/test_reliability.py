"""What happens when things go wrong: damaged files, pickles, NaN, full disks, bad flags.

Every failure must name the file (or flag) and leave what was on disk before intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as st_save

import softprompt.io.runs as runs
import softprompt.train.loop as train_module
from softprompt.cli import app
from softprompt.io.runs import (
    CHECKPOINT_FILE,
    PROMPT_FILE,
    CheckpointError,
    PromptFileError,
    RunNotFinished,
    is_done,
    load_checkpoint,
    load_prompt,
    read_run,
    save_checkpoint,
    save_prompt,
)
from softprompt.io.sources import load_prompt_source
from softprompt.train.config import TrainConfig
from softprompt.train.loop import TrainingDiverged, train

from conftest import FIXTURE_DATA
from tiny_train import fail_at_loss_step, tiny_config


def small_config(**overrides) -> TrainConfig:
    return tiny_config(**{"model": "unused", "epochs": 2, "checkpoint_every": 2, **overrides})


def run_train(backbone, out: Path, **overrides) -> dict:
    return train(small_config(**overrides), out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)




@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / PROMPT_FILE
    save_prompt(path, torch.arange(12.0).view(3, 4), {"model": "m"})
    return path


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, {"prompt": torch.ones(3, 4), "rng.data_order": torch.zeros(8, dtype=torch.uint8)}, {"epoch": 1, "step": 7})
    return path


# ---- integrity: truncated or altered files are refused, naming the file ----

LOADERS = {"prompt": (load_prompt, PromptFileError), "checkpoint": (load_checkpoint, CheckpointError)}


@pytest.mark.parametrize("kind", list(LOADERS), ids=list(LOADERS))
@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0], ids=["half", "last-byte-lost", "empty"])
def test_truncated_file_is_refused_naming_it(kind, keep, prompt_file, checkpoint_file):
    path = {"prompt": prompt_file, "checkpoint": checkpoint_file}[kind]
    load, error = LOADERS[kind]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(error, match=rf"^{re.escape(str(path))}: not a readable safetensors file"):
        load(path)


@pytest.mark.parametrize("kind", list(LOADERS), ids=list(LOADERS))
def test_altered_tensor_bytes_fail_the_checksum(kind, prompt_file, checkpoint_file):
    path = {"prompt": prompt_file, "checkpoint": checkpoint_file}[kind]
    load, error = LOADERS[kind]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor value
    path.write_bytes(bytes(data))
    with pytest.raises(error, match=rf"^{re.escape(str(path))}: checksum mismatch"):
        load(path)


def test_altered_checkpoint_state_fails_the_checksum(checkpoint_file):
    data = checkpoint_file.read_bytes()
    assert b'\\"step\\": 7' in data
    checkpoint_file.write_bytes(data.replace(b'\\"step\\": 7', b'\\"step\\": 9'))  # same length, valid JSON
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(checkpoint_file))}: checksum mismatch"):
        load_checkpoint(checkpoint_file)


def test_safetensors_whose_header_length_looks_like_a_pickle_still_loads(tmp_path):
    # A header of 0x280 bytes makes the file start with b"\x80\x02", a pickle's first two bytes.
    path = tmp_path / PROMPT_FILE
    for pad in range(600):
        data = st_save({"prompt": torch.ones(2, 3)}, metadata={"pad": "x" * pad})
        if data.startswith(b"\x80\x02"):
            break
    assert data[:8] == (0x280).to_bytes(8, "little")  # the loop found it: not an ordinary file's round trip
    assert data[:2] == pickle.PROTO + bytes([2])  # what a protocol-2 pickle starts with
    path.write_bytes(data)
    prompt, _ = load_prompt(path)
    assert torch.equal(prompt, torch.ones(2, 3))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(PromptFileError, match=rf"prompt file not found: {re.escape(str(tmp_path / PROMPT_FILE))}"):
        load_prompt(tmp_path)
    with pytest.raises(CheckpointError, match=rf"checkpoint not found: {re.escape(str(tmp_path / CHECKPOINT_FILE))}"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)


# ---- untrusted files: pickles are refused and never unpickled ----


class Boobytrap:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["prompt.safetensors", "prompt.bin", "prompt.pt", "prompt.pkl", "adapter_model.safetensors"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-5"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, name, writer):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    payload = {"prompt": Boobytrap(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    for load, error in LOADERS.values():
        with pytest.raises(error, match=rf"^{re.escape(str(path))}: refusing a pickle-based file"):
            load(path)
    assert not marker.exists()


def test_resume_refuses_a_pickled_checkpoint(tmp_path, tiny_backbone, monkeypatch):
    out = tmp_path / "run"
    crash_after_forward(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_backbone, out)
    monkeypatch.undo()
    torch.save({"prompt": torch.ones(4, 16)}, out / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(out / CHECKPOINT_FILE))}: refusing a pickle-based file"):
        train(small_config(), out, backbone=tiny_backbone, data_dir=FIXTURE_DATA, progress=False, resume=True)


# ---- half-written runs are never used as results ----


def crash_after_forward(monkeypatch, n: int, exc: BaseException = KeyboardInterrupt()) -> None:
    fail_at_loss_step(monkeypatch, n, exc)


def test_a_half_written_run_is_not_done_and_is_refused(tmp_path, tiny_backbone, monkeypatch):
    out = tmp_path / "run"
    crash_after_forward(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_backbone, out)
    assert read_run(out)["status"] == "running" and (out / PROMPT_FILE).is_file()
    assert not is_done(out)
    with pytest.raises(RunNotFinished, match=rf"{re.escape(str(out))} is not a finished run \(status 'running'\)"):
        load_prompt_source(out)
    result = CliRunner().invoke(app, ["evaluate", "--task", "cb", "--prompt", str(out)])
    assert result.exit_code == 2 and "is not a finished run" in result.output
    load_prompt(out / PROMPT_FILE)  # the file itself is still there for whoever asks for it by name


# ---- numerical faults ----


def nan_loss_at(monkeypatch, n: int, finite_loss_nan_grad: bool = False) -> None:
    calls = {"n": 0}
    real = train_module.loss_step

    def loss_step(backbone, prompt, batch):
        calls["n"] += 1
        loss = real(backbone, prompt, batch)
        if calls["n"] == n:
            if finite_loss_nan_grad:  # sqrt'(0) * 0: loss unchanged, gradient NaN
                return loss + torch.sqrt(prompt * 0).sum()
            return loss * float("nan")
        return loss

    monkeypatch.setattr(train_module, "loss_step", loss_step)


@pytest.mark.parametrize(
    "grad, message",
    [(False, r"loss is nan at epoch 2, step 7"), (True, r"gradient is not finite at epoch 2, step 7")],
    ids=["nan-loss", "nan-gradient"],
)
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_backbone, monkeypatch, grad, message):
    out = tmp_path / "run"
    nan_loss_at(monkeypatch, 7, finite_loss_nan_grad=grad)  # 5 steps per epoch: step 7 is mid-epoch 2
    with pytest.raises(TrainingDiverged, match=rf"training stopped: {message}; the last good prompt is kept in {re.escape(str(out / PROMPT_FILE))}"):
        run_train(tiny_backbone, out)
    record = read_run(out)
    assert record["status"] == "diverged" and re.search(message, record["error"])
    tensors, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["step"] == 6 and torch.isfinite(tensors["prompt"]).all()  # the checkpoint before the fault
    prompt, meta = load_prompt(out / PROMPT_FILE)
    assert torch.isfinite(prompt).all() and meta["epoch"] == "1"
    assert not is_done(out)


@pytest.mark.parametrize("max_steps, where", [(None, "epoch 1, step 5"), (3, "epoch 1, step 3")], ids=["epoch-end", "max-steps"])
def test_a_bad_last_step_is_caught_before_anything_is_saved(tmp_path, tiny_backbone, monkeypatch, max_steps, where):
    """The step's finiteness check is read with the next loss (no extra host sync); a step with no next
    loss (an epoch's last, or the --max-steps one) is still checked before dev scoring and saving."""
    out = tmp_path / "run"
    nan_loss_at(monkeypatch, int(where[-1]), finite_loss_nan_grad=True)
    with pytest.raises(TrainingDiverged, match=rf"gradient is not finite at {where}"):
        run_train(tiny_backbone, out, max_steps=max_steps)
    prompt, meta = load_prompt(out / PROMPT_FILE)
    assert torch.isfinite(prompt).all() and "epoch" not in meta  # the init: no epoch ended


def test_cli_exits_3_on_divergence(tmp_path, tiny_model_dir, monkeypatch):
    nan_loss_at(monkeypatch, 2)
    out = tmp_path / "run"
    args = ["train", "--task", "cb", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--min-dev-examples", "4",
            "--batch-size", "4", "--num-tokens", "4", "--max-length", "64", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "training stopped: loss is nan at epoch 1, step 2" in result.output


def test_max_grad_norm_clips_the_gradient_the_optimizer_sees(tmp_path, tiny_backbone, monkeypatch):
    norms: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        norms.append(float(self.param_groups[0]["params"][0].grad.norm()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_train(tiny_backbone, tmp_path / "free", max_steps=3, epochs=1)
    free, norms[:] = list(norms), []
    run_train(tiny_backbone, tmp_path / "clipped", max_steps=3, epochs=1, max_grad_norm=1e-4)
    assert len(norms) == 3 and all(n == pytest.approx(1e-4, rel=1e-3) for n in norms)
    assert min(free) > 1e-3  # without the flag every gradient is 10x larger: the clip did something


# ---- disk full, unwritable output ----


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_disk_full_names_the_path_and_keeps_the_old_file(prompt_file, monkeypatch, where):
    before = prompt_file.read_bytes()
    monkeypatch.setattr(runs.os, where, fail_with_enospc)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(prompt_file))}: No space left on device; the previous file"):
        save_prompt(prompt_file, torch.zeros(5, 4))
    monkeypatch.undo()
    assert prompt_file.read_bytes() == before
    assert [p.name for p in prompt_file.parent.iterdir()] == [PROMPT_FILE]  # no temp file left behind


@pytest.mark.may_skip
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the injected failures above cover it")
def test_read_only_folder_names_the_path(prompt_file):
    before = prompt_file.read_bytes()
    prompt_file.parent.chmod(0o500)
    try:
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(prompt_file))}: Permission denied"):
            save_prompt(prompt_file, torch.zeros(5, 4))
    finally:
        prompt_file.parent.chmod(0o700)
    assert prompt_file.read_bytes() == before


def test_disk_full_during_training_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"
    real_replace = os.replace
    checkpoints = {"n": 0}

    def replace(src, dst):
        if Path(dst).name == CHECKPOINT_FILE:
            checkpoints["n"] += 1
            if checkpoints["n"] == 2:
                checkpoints["second"] = Path(src).read_bytes()  # the whole file, as it goes into place
            if checkpoints["n"] == 3:
                fail_with_enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", replace)
    args = ["train", "--task", "cb", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--min-dev-examples", "4",
            "--batch-size", "4", "--num-tokens", "4", "--max-length", "64", "--device", "cpu", "--checkpoint-every", "1", "--epochs", "2",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert f"cannot write {out / CHECKPOINT_FILE}: No space left on device" in result.output
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["step"] == 2  # the second checkpoint, intact: byte for byte the file written at step 2
    assert (out / CHECKPOINT_FILE).read_bytes() == checkpoints["second"]
    assert not list(out.glob(".*.tmp"))
    resumed = CliRunner().invoke(app, ["train", "--resume", str(out)])  # space freed: carry on
    assert resumed.exit_code == 0, resumed.output
    assert is_done(out)


def test_unwritable_out_is_reported_before_training(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["train", "--task", "cb", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--min-dev-examples", "4",
            "--device", "cpu", "--out", str(blocker / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"cannot write {blocker / 'run' / PROMPT_FILE}" in result.output


# ---- command-line arguments out of range are refused before any model loads ----


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--num-tokens", "0", "--num-tokens must be at least 1, got 0"),
        ("--lr", "-1", "--lr must be a positive number, got -1.0"),
        ("--lr", "nan", "--lr must be a positive number, got nan"),
        ("--patience", "-1", "--patience must be >= 0, got -1"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--device", "tpu", "--device 'tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
        ("--checkpoint-every", "0", "--checkpoint-every must be at least 1, got 0"),
        ("--epochs", "0", "--epochs must be at least 1, got 0"),
        ("--dev-fraction", "1", "--dev-fraction must be between 0 and 1, got 1.0"),
        ("--max-grad-norm", "0", "--max-grad-norm must be positive, got 0.0"),
        ("--seed", "-1", "--seed must be between 0 and 2**32 - 1, got -1"),
        ("--weight-decay", "-0.1", "--weight-decay must be a number >= 0, got -0.1"),
        ("--min-dev-examples", "0", "--min-dev-examples must be at least 1, got 0"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("--") else None,
)
def test_out_of_range_flags_are_refused_before_any_model_loads(tmp_path, monkeypatch, flag, value, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a command line that should have been refused")

    monkeypatch.setattr(train_module, "load_backbone", no_model)
    result = CliRunner().invoke(app, ["train", "--task", "cb", "--out", str(tmp_path / "run"), flag, value])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x"], "missing option --task"),
        (["--task", "cb"], "missing option --out"),
        (["--task", "nope", "--out", "x"], "unknown task 'nope'; choose one of: cb, rte, copa, wsc"),
        (["--task", "cb", "--out", "x", "--num-tokens", "many"], "'many' is not a valid integer"),
    ],
    ids=["no-task", "no-out", "unknown-task", "not-a-number"],
)
def test_missing_or_malformed_flags_exit_2(args, message):
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2 and message in result.output


def one_epoch_args(tiny_model_dir: Path, out: Path) -> list[str]:
    """`softprompt train` for one epoch of the fixture's CB rows (5 steps), a checkpoint at every step."""
    return ["train", "--task", "cb", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--min-dev-examples", "4",
            "--batch-size", "4", "--num-tokens", "4", "--max-length", "64", "--device", "cpu", "--epochs", "1",
            "--checkpoint-every", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def one_epoch_reference(tiny_model_dir, tmp_path_factory) -> Path:
    """`one_epoch_args` run uninterrupted: what an interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = CliRunner().invoke(app, one_epoch_args(tiny_model_dir, out))
    assert result.exit_code == 0, result.output
    return out


def test_ctrl_c_tells_how_to_resume(tmp_path, tiny_model_dir, one_epoch_reference, monkeypatch):
    crash_after_forward(monkeypatch, 4)  # KeyboardInterrupt, as Ctrl-C raises it
    out = tmp_path / "run"
    result = CliRunner().invoke(app, one_epoch_args(tiny_model_dir, out))
    assert result.exit_code == 130
    assert f"interrupted; continue from the last checkpoint with: softprompt train --resume {out}" in result.output
    monkeypatch.undo()
    assert CliRunner().invoke(app, ["train", "--resume", str(out)]).exit_code == 0
    assert read_run(out)["resumed_at_step"] == [3]
    assert torch.equal(load_prompt(out)[0], load_prompt(one_epoch_reference)[0])  # as if never interrupted
