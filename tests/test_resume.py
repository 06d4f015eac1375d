"""Checkpoint/resume and determinism: a killed run resumes to the bit-identical prompt.

Runs train a tiny random Llama (hidden 16) saved to disk with `save_pretrained`, on the fixture
rows of CB: 20 train examples, batch 4, so 5 optimizer steps per epoch and 3 epochs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import softprompt.train.loop as train_module
from softprompt.backbones.loading import load_backbone
from softprompt.cli import app
from softprompt.io.runs import CHECKPOINT_FILE, PROMPT_FILE, RUN_FILE, CheckpointError, load_checkpoint, load_prompt, read_run
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train

from conftest import FIXTURE_DATA
from tiny_train import fail_at_loss_step, tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS_PER_EPOCH = 5




def cli_args(tiny_model_dir: Path, **overrides) -> list[str]:
    options = dict(
        task="cb", model=str(tiny_model_dir), data_dir=str(FIXTURE_DATA), min_dev_examples=4, batch_size=4, epochs=3,
        patience=5, num_tokens=4, max_length=64, lr=0.3, device="cpu", checkpoint_every=1,
    )
    options.update(overrides)
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def config_for(tiny_model_dir: Path, **overrides) -> TrainConfig:
    return tiny_config(**{"model": str(tiny_model_dir), "epochs": 3, "patience": 5, "checkpoint_every": 1, **overrides})


def run_cli(*args: str):
    return CliRunner().invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted run, seed 0, through the CLI in this process."""
    out = tmp_path_factory.mktemp("reference")
    result = run_cli(*cli_args(tiny_model_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bf16_reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The same uninterrupted run with bf16 weights (the fast path's dtype on a CPU with native bf16)."""
    out = tmp_path_factory.mktemp("reference-bf16")
    result = run_cli(*cli_args(tiny_model_dir, dtype="bfloat16"), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(str(tiny_model_dir), "cpu")


def final_prompt(run_dir: Path) -> torch.Tensor:
    return load_prompt(run_dir / PROMPT_FILE)[0]


def deterministic_history(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in read_run(run_dir)["history"]]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_model_dir, request, tmp_path, dtype):
    reference = request.getfixturevalue("reference" if dtype == "auto" else "bf16_reference")
    out = tmp_path / "run"
    args = ["-m", "softprompt.cli", "train", *cli_args(tiny_model_dir, dtype=dtype), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    log = tmp_path / "child.log"
    with open(log, "wb") as sink:
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=sink, stderr=subprocess.STDOUT)
    killed_at = None
    try:
        deadline = time.time() + 90
        while time.time() < deadline and child.poll() is None:
            # Stopped while its checkpoint is read: a child that finishes meanwhile would delete it.
            child.send_signal(signal.SIGSTOP)
            if (out / CHECKPOINT_FILE).is_file():
                _, state = load_checkpoint(out / CHECKPOINT_FILE)
                if state["epoch"] >= 1 and state["batch"] > 0:  # mid-epoch, after a whole epoch (8 chances on a busy machine)
                    child.send_signal(signal.SIGKILL)
                    killed_at = state
                    break
            child.send_signal(signal.SIGCONT)
            time.sleep(0.01)
    finally:
        if child.poll() is None and killed_at is None:
            child.kill()  # SIGKILL ends a stopped process too
        child.wait()
    assert killed_at is not None, f"the child finished or stalled before it could be killed mid-epoch:\n{log.read_text()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert read_run(out)["status"] == "running"  # a killed run is not finished ...
    _, state = load_checkpoint(out / CHECKPOINT_FILE)  # ... and its last checkpoint is intact
    assert state["step"] >= killed_at["step"]

    result = run_cli("--resume", str(out))
    assert result.exit_code == 0, result.output
    assert torch.equal(final_prompt(out), final_prompt(reference))
    assert deterministic_history(out) == deterministic_history(reference)
    record = read_run(out)
    assert record["status"] == "done" and record["resumed_at_step"] == [state["step"]]
    assert not list(out.glob(".*.tmp"))  # a temp file a kill left mid-write is cleaned up on resume


class Crash(Exception):
    """Stands in for a crash at a chosen forward."""


def crash_on_forward(monkeypatch, n: int) -> None:
    fail_at_loss_step(monkeypatch, n, Crash(f"crash at forward {n}"))


@pytest.mark.parametrize("grad_accum, optimizer", [(1, "adamw"), (2, "adamw"), (1, "adafactor")], ids=["accum1", "accum2", "adafactor"])
def test_resume_in_process_after_crash_matches_uninterrupted(tiny_model_dir, backbone, reference, tmp_path, monkeypatch, grad_accum, optimizer):
    # Adafactor keeps other state (factored second moments, RMS, its own step count) that must come back too.
    config = config_for(tiny_model_dir, checkpoint_every=2, grad_accum=grad_accum, optimizer=optimizer)
    uninterrupted = reference  # checkpointing every step there, every 2 here: the schedule changes nothing
    if (grad_accum, optimizer) != (1, "adamw"):
        uninterrupted = tmp_path / "uninterrupted"
        train(config, uninterrupted, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)

    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        crash_on_forward(m, 8)  # a forward in the second epoch; the last checkpoint is some forwards earlier
        with pytest.raises(Crash):
            train(config, out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)
    _, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert state["epoch"] == 1 and 0 < state["batch"] < 7  # mid-epoch, and forwards after it are replayed
    train(config, out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False, resume=True)
    assert torch.equal(final_prompt(out), final_prompt(uninterrupted))
    assert deterministic_history(out) == deterministic_history(uninterrupted)


def test_checkpoint_holds_optimizer_rng_and_early_stopping_state(tiny_model_dir, backbone, reference, tmp_path, monkeypatch):
    # A finished run deletes its checkpoint: crash after the last epoch's checkpoint, before the final scoring.
    def crash(*_):
        raise Crash("crash after the last epoch")

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train_module, "load_prompt", crash)  # train calls it only to score the best prompt at the end
        with pytest.raises(Crash):
            train(config_for(tiny_model_dir), out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)
    tensors, state = load_checkpoint(out / CHECKPOINT_FILE)
    assert {"prompt", "optimizer.exp_avg", "optimizer.exp_avg_sq", "optimizer.step", "rng.data_order", "rng.torch_cpu"} <= set(tensors)
    assert state["epoch"] == 3 and state["batch"] == 0 and state["step"] == 3 * STEPS_PER_EPOCH
    assert float(tensors["optimizer.step"]) == 3 * STEPS_PER_EPOCH
    assert state["best_epoch"] == read_run(reference)["best_epoch"] and state["best_loss"] is not None
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]

    # resuming it only scores the best prompt; then the folder holds exactly what an uninterrupted run leaves
    train(config_for(tiny_model_dir), out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False, resume=True)
    assert read_run(out)["status"] == "done" and read_run(out)["resumed_at_step"] == [3 * STEPS_PER_EPOCH]
    assert torch.equal(final_prompt(out), final_prompt(reference))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir()) == [PROMPT_FILE, RUN_FILE]


def test_same_seed_is_bit_identical_and_another_seed_differs(tiny_model_dir, backbone, reference, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    train(config_for(tiny_model_dir), again, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)
    train(config_for(tiny_model_dir, seed=1), other, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)
    assert torch.equal(final_prompt(again), final_prompt(reference))
    assert not torch.equal(final_prompt(other), final_prompt(reference))


def test_bf16_same_seed_is_bit_identical_and_differs_from_fp32(tiny_model_dir, bf16_reference, reference, tmp_path):
    again = tmp_path / "again"
    assert run_cli(*cli_args(tiny_model_dir, dtype="bfloat16"), "--out", str(again)).exit_code == 0
    assert torch.equal(final_prompt(again), final_prompt(bf16_reference))
    assert not torch.equal(final_prompt(bf16_reference), final_prompt(reference))  # bf16 really ran


def test_run_json_records_what_repeats_a_run(reference):
    record = read_run(reference)
    assert record["config"]["seed"] == 0 and record["config"]["data_seed"] == 0
    assert record["config"] == config_for(record["config"]["model"]).to_json()
    assert len(record["data"]["train_sha256"]) == 64 and Path(record["data"]["dir"]) == FIXTURE_DATA.resolve()
    assert {"torch", "transformers", "softprompt", "git_commit"} <= set(record["provenance"])


def test_resume_refuses_a_finished_run(reference):
    result = run_cli("--resume", str(reference))
    assert result.exit_code == 2
    assert "finished run (status done)" in result.output and str(reference) in result.output


@pytest.fixture
def crashed_run(tiny_model_dir, backbone, tmp_path, monkeypatch) -> Path:
    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        crash_on_forward(m, 3)
        with pytest.raises(Crash):
            train(config_for(tiny_model_dir), out, backbone=backbone, data_dir=FIXTURE_DATA, progress=False)
    return out


def test_resume_refuses_another_config(tiny_model_dir, backbone, crashed_run):
    with pytest.raises(ValueError, match=r"cannot resume .* another config \(--lr 0.3 -> 0.1\)"):
        train(config_for(tiny_model_dir, lr=0.1), crashed_run, backbone=backbone, data_dir=FIXTURE_DATA, resume=True)
    result = run_cli("--resume", str(crashed_run), "--num-tokens", "8")
    assert result.exit_code == 2 and "--num-tokens 4 -> 8" in result.output


def test_resume_refuses_changed_data(tiny_model_dir, backbone, crashed_run, tmp_path):
    data = tmp_path / "data"
    (data / "CB").mkdir(parents=True)
    for split in ("train", "val"):
        lines = (FIXTURE_DATA / "CB" / f"{split}.jsonl").read_text().splitlines()
        (data / "CB" / f"{split}.jsonl").write_text("\n".join(lines[:-1] if split == "train" else lines) + "\n")
    with pytest.raises(ValueError, match=r"the train data in .* changed since the run started"):
        train(config_for(tiny_model_dir), crashed_run, backbone=backbone, data_dir=data, resume=True)


def test_fresh_train_refuses_to_overwrite_a_run(tiny_model_dir, backbone, crashed_run):
    before = (crashed_run / RUN_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run; continue it with `softprompt train --resume"):
        train(config_for(tiny_model_dir), crashed_run, backbone=backbone, data_dir=FIXTURE_DATA)
    assert (crashed_run / RUN_FILE).read_bytes() == before


def test_resume_may_change_checkpoint_every(tiny_model_dir, crashed_run, reference, tmp_path, monkeypatch):
    # $SOFTPROMPT_DATA_DIR pointing elsewhere (as `make test` sets it) must not replace the run's own data
    monkeypatch.setenv("SOFTPROMPT_DATA_DIR", str(tmp_path))
    result = run_cli("--resume", str(crashed_run), "--checkpoint-every", "100")
    assert result.exit_code == 0, result.output
    assert read_run(crashed_run)["status"] == "done"
    # the checkpoint schedule changes nothing: the crashed run (the reference's config) ends where the reference did
    assert torch.equal(final_prompt(crashed_run), final_prompt(reference))
    assert deterministic_history(crashed_run) == deterministic_history(reference)


def test_resume_needs_a_run_folder(tmp_path):
    result = run_cli("--resume", str(tmp_path))
    assert result.exit_code == 2 and f"no run.json in {tmp_path}" in result.output


def test_checkpoint_of_another_prompt_shape_is_refused(tiny_model_dir, backbone, crashed_run):
    record = json.loads((crashed_run / RUN_FILE).read_text())
    record["config"]["num_tokens"] = 6  # a run.json edited by hand, out of step with its checkpoint
    (crashed_run / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"checkpoint.safetensors: prompt of shape \[4, 16\], expected \[6, 16\]"):
        train(config_for(tiny_model_dir, num_tokens=6), crashed_run, backbone=backbone, data_dir=FIXTURE_DATA, resume=True)
