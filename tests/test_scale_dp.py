"""One prompt trained data-parallel: `torchrun --nproc-per-node 2 -m softprompt.cli train` with gloo on CPU.

The same tiny run as tests/test_resume.py (a random Llama of hidden 16, CB fixture rows, batch 4,
2 epochs of 5 steps) at the same global batch must give the prompt one process gives, within 1e-5;
rank 0 alone writes the folder; a data-parallel run killed mid-epoch resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import CHECKPOINT_FILE, PROMPT_FILE, RUN_FILE, load_checkpoint, load_prompt, read_run
from softprompt.train.distributed import share
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train

from conftest import FIXTURE_DATA

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
# lr 0.01: AdamW divides by the gradient's own scale, so the ranks' float rounding (1e-9 on gradients
# of 5e-4 here) moves the prompt in proportion to lr: 6e-5 apart after 15 steps at lr 0.3.
FIELDS = dict(task="cb", min_dev_examples=4, batch_size=4, epochs=2, patience=5, num_tokens=4, max_length=64, lr=0.01,
              device="cpu", checkpoint_every=1)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "softprompt.cli", "train", *args]


def train_args(model: Path, out: Path) -> list[str]:
    options = {**FIELDS, "model": str(model), "data_dir": str(FIXTURE_DATA), "out": str(out)}
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> Path:
    """The run in one process."""
    out = tmp_path_factory.mktemp("single")
    train(TrainConfig(model=str(tiny_model_dir), **FIELDS), out, backbone=load_backbone(str(tiny_model_dir), "cpu"),
          data_dir=FIXTURE_DATA, progress=False)
    return out


def prompt(run: Path) -> torch.Tensor:
    return load_prompt(run / PROMPT_FILE)[0]


def test_shares_cover_the_batch_once_in_order():
    items = list(range(7))
    assert [share(items, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [share(items[:1], r, 2) for r in range(2)] == [[0], []]  # a batch smaller than the world: a rank sits out


def test_two_processes_train_the_prompt_one_process_does(single, tiny_model_dir, tmp_path):
    out = tmp_path / "dp"
    done = subprocess.run(torchrun(*train_args(tiny_model_dir, out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cb: best epoch") == 1  # rank 0 reports, rank 1 does not
    record, reference = read_run(out), read_run(single)
    assert record["provenance"]["world_size"] == 2 and record["steps"] == reference["steps"] == 10
    torch.testing.assert_close(prompt(out), prompt(single), rtol=0, atol=1e-5)
    for mine, theirs in zip(record["history"], reference["history"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert mine["dev_loss"] == pytest.approx(theirs["dev_loss"], abs=1e-5)
    assert sorted(p.name for p in out.iterdir()) == [PROMPT_FILE, RUN_FILE]  # one writer: no stray temp files


def family(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts each rank in a session of its own: no shared process group)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]
    return [pid] + [p for c in children for p in family(c)]


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_a_killed_data_parallel_run_resumes(single, tiny_model_dir, tmp_path):
    out = tmp_path / "dp"
    launcher = subprocess.Popen(torchrun(*train_args(tiny_model_dir, out)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None:
            pids = family(launcher.pid)
            signal_all(pids, signal.SIGSTOP)  # torchrun and both ranks, stopped while the checkpoint is read
            if len(pids) == 3 and (out / CHECKPOINT_FILE).is_file():
                _, state = load_checkpoint(out / CHECKPOINT_FILE)
                if state["epoch"] >= 1 and state["batch"] > 0:
                    signal_all(pids, signal.SIGKILL)
                    killed = state
                    break
            signal_all(pids, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        if killed is None:
            signal_all(family(launcher.pid), signal.SIGKILL)
        launcher.wait()
    assert killed is not None, "the run finished before it could be killed mid-epoch"
    assert read_run(out)["status"] == "running"

    resumed = subprocess.run(torchrun("--resume", str(out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = read_run(out)
    assert record["status"] == "done" and record["resumed_at_step"][0] >= killed["step"] > 0
    torch.testing.assert_close(prompt(out), prompt(single), rtol=0, atol=1e-5)
