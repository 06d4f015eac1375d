"""The study grid on several workers: executors give the same results, run locks, killed workers and drivers.

A tiny study (CB and RTE, seed 0, a random Llama of hidden 16, 3 epochs of 5 steps, a checkpoint
every step) is trained once in this process at one torch thread; every other executor must give
the very same prompts and results.json (timings aside). One local Ray (2 CPUs, no dashboard) serves
the whole module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from softprompt.cli import app
from softprompt.io.locks import RunLock, RunLocked, lock_holder
from softprompt.io.runs import CHECKPOINT_FILE, PROMPT_FILE, is_done, load_checkpoint, load_prompt, read_run
import softprompt.study.executors as executors
from softprompt.study.executors import ExecutorConfig, RunJob, RunOutcome, check_runs_visible
from softprompt.study.pipeline import StudyConfig, run_study

from conftest import FIXTURE_DATA

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
RUNS = ("cb-s0", "rte-s0")
ONE_THREAD = ExecutorConfig(workers="1", cpus_per_run=1)


def study_toml(model: Path) -> str:
    return (
        f'tasks = ["cb", "rte"]\nseeds = [0]\nmodel = "{model}"\nnum_tokens = 4\nlr = 0.3\nepochs = 3\nbatch_size = 4\n'
        'min_dev_examples = 4\nmax_length = 64\ncheckpoint_every = 1\neval_batch_size = 8\ntop_k = 2\ndevice = "cpu"\n'
    )


def tiny_study(model: Path) -> StudyConfig:
    import tomllib

    return StudyConfig.from_dict(tomllib.loads(study_toml(model)))


def study(config: StudyConfig, out: Path, executor: ExecutorConfig, echo=lambda _: None) -> dict:
    return run_study(config, out, data_dir=FIXTURE_DATA, progress=False, echo=echo, executor=executor)


def timeless(obj):
    """results.json without wall-clock times and how this call got its runs (reused, resumed): what another executor must reproduce exactly."""
    if isinstance(obj, dict):
        return {k: timeless(v) for k, v in obj.items() if k not in ("wall_s", "analysis_wall_s", "interpretation_wall_s", "stage_wall_s", "reused", "resumed_at_step")}
    if isinstance(obj, list):
        return [timeless(v) for v in obj]
    return obj


def results(out: Path) -> dict:
    return timeless(json.loads((out / "results.json").read_text()))


def prompt(out: Path, name: str) -> torch.Tensor:
    return load_prompt(out / "runs" / name / PROMPT_FILE)[0]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.time() - started:.1f} s")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The study in this process, one run after another, one torch thread."""
    out = tmp_path_factory.mktemp("reference")
    study(tiny_study(tiny_model_dir), out, ONE_THREAD)
    return out


def assert_same_study(out: Path, reference: Path) -> None:
    for name in RUNS:
        assert torch.equal(prompt(out, name), prompt(reference, name)), name
    assert results(out) == results(reference)


def test_ray_gives_the_same_prompts_and_results(ray_local, reference, tiny_model_dir, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(study_toml(tiny_model_dir))
    out = tmp_path / "ray"
    args = ["study", str(config), "--out", str(out), "--data-dir", str(FIXTURE_DATA), "--quiet",
            "--executor", "ray", "--workers", "2", "--cpus-per-run", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {read_run(out / "runs" / name)["provenance"]["torch_threads"] for name in RUNS} == {1}
    assert_same_study(out, reference)


HOLD_LOCK = """
import sys, time
from softprompt.io.locks import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(run)["pid"] == holder.pid
        with pytest.raises(RunLocked, match=rf"{run} is being trained by another process \(pid {holder.pid} on "):
            with RunLock(run, timeout_s=0.3):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        holder.wait()
    assert (run / ".lock").is_file() and lock_holder(run) is None  # the file stays, the lock does not
    with RunLock(run, timeout_s=0):
        assert lock_holder(run)["pid"] == os.getpid()
    assert lock_holder(run) is None


TRAIN_ONE = """
import json, sys
from softprompt.study.executors import RunJob, train_run
from softprompt.train.config import TrainConfig
config = TrainConfig(**json.loads(sys.argv[1]))
print(json.dumps(train_run(RunJob("cb-s0", config, sys.argv[2], sys.argv[3], threads=1)).__dict__), flush=True)
"""


def test_two_processes_never_train_the_same_run(reference, tmp_path):
    config = json.dumps(read_run(reference / "runs" / "cb-s0")["config"])
    run = tmp_path / "cb-s0"
    args = [sys.executable, "-c", TRAIN_ONE, config, str(run), str(FIXTURE_DATA)]
    children = [subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [json.loads(child.communicate(timeout=240)[0].strip().splitlines()[-1]) for child in children]
    assert sorted(o["status"] for o in outcomes) == ["done", "skipped"]  # one trained it, the other found it done
    assert not any(o["resumed"] for o in outcomes)
    assert read_run(run)["resumed_at_step"] == []  # trained once, start to end
    assert torch.equal(load_prompt(run / PROMPT_FILE)[0], prompt(reference, "cb-s0"))


def kill_mid_run(run: Path, killed: list[int], deadline_s: float = 180) -> None:
    """SIGKILL whichever process holds `run`'s lock once its checkpoint is mid-epoch after a whole epoch."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and not is_done(run):
        holder = lock_holder(run)
        pid = holder and holder.get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGSTOP)  # stopped while the checkpoint is read: it cannot finish meanwhile
            except ProcessLookupError:
                continue
            try:
                if (run / CHECKPOINT_FILE).is_file():
                    _, state = load_checkpoint(run / CHECKPOINT_FILE)
                    if state["epoch"] >= 1 and state["batch"] > 0:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            finally:
                if not killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_worker_killed_mid_run_is_retried_and_resumes(executor, request, reference, tiny_model_dir, tmp_path):
    """Two workers of one thread each; the one training cb-s0 is SIGKILLed mid-epoch (local: the pool breaks and is rebuilt)."""
    if executor == "ray":
        request.getfixturevalue("ray_local")
    killed: list[int] = []
    killer = threading.Thread(target=kill_mid_run, args=(tmp_path / "runs" / "cb-s0", killed), daemon=True)
    killer.start()
    lines: list[str] = []
    study(tiny_study(tiny_model_dir), tmp_path, ExecutorConfig(executor=executor, workers="2", cpus_per_run=1), lines.append)
    killer.join()
    assert killed, f"the run finished before it could be killed mid-epoch:\n" + "\n".join(lines)
    record = read_run(tmp_path / "runs" / "cb-s0")
    assert record["status"] == "done" and record["resumed_at_step"] and record["resumed_at_step"][0] > 0
    assert any(line.startswith("run 1/2: cb seed 0 (resumed): val accuracy") for line in lines), lines
    pids = {line.split("(pid ")[1].split()[0] for line in lines if "(pid " in line}
    assert pids and str(os.getpid()) not in pids  # trained by workers, not by this process
    assert_same_study(tmp_path, reference)  # the same as one process at one thread: resumed to the very same prompt


def test_killed_driver_rerun_continues_with_finished_runs_skipped(reference, tiny_model_dir, tmp_path):
    config, out = tmp_path / "tiny.toml", tmp_path / "study"
    config.write_text(study_toml(tiny_model_dir))
    args = [sys.executable, "-m", "softprompt.cli", "study", str(config), "--out", str(out), "--data-dir", str(FIXTURE_DATA),
            "--quiet", "--workers", "1", "--cpus-per-run", "1"]
    driver = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            driver.send_signal(signal.SIGSTOP)
            if is_done(out / "runs" / "cb-s0"):
                break
            driver.send_signal(signal.SIGCONT)
            time.sleep(0.01)
    finally:
        driver.kill()
        driver.wait()
    assert is_done(out / "runs" / "cb-s0") and not is_done(out / "runs" / "rte-s0") and not (out / "results.json").exists()
    stamp = (out / "runs" / "cb-s0" / PROMPT_FILE).stat().st_mtime_ns
    lines: list[str] = []
    study(tiny_study(tiny_model_dir), out, ONE_THREAD, lines.append)
    assert "run 1/2: cb seed 0 (done, skipped)" in lines
    assert (out / "runs" / "cb-s0" / PROMPT_FILE).stat().st_mtime_ns == stamp
    assert_same_study(out, reference)


def test_driver_names_a_run_folder_it_cannot_see(tiny_model_dir, tmp_path):
    job = RunJob("cb-s0", tiny_study(tiny_model_dir).train_config("cb", 0), str(tmp_path / "elsewhere"), None)
    outcome = RunOutcome("cb-s0", "done", host="node-7", pid=123, val_accuracy=50.0, wall_s=1.0)
    with pytest.raises(FileNotFoundError, match=r"run cb-s0 finished on node-7 \(pid 123\), but .*elsewhere holds no finished run here: put the study folder on storage every node mounts"):
        check_runs_visible([job], {"cb-s0": outcome})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"executor": "spark"}, r"--executor must be one of local, ray, got 'spark'"),
        ({"workers": "0"}, r"--workers must be a whole number of at least 1 or auto, got '0'"),
        ({"workers": "many"}, r"--workers must be a whole number of at least 1 or auto, got 'many'"),
        ({"cpus_per_run": 0}, r"--cpus-per-run must be at least 1, got 0"),
        ({"ray_address": "10.0.0.1:6379"}, r"--ray-address needs --executor ray"),
        ({"gpus_per_run": 1.0}, r"--gpus-per-run needs --executor ray"),
        ({"executor": "ray", "gpus_per_run": -1.0}, r"--gpus-per-run must be >= 0, got -1.0"),
        ({"max_retries": -1}, r"--max-retries must be >= 0, got -1"),
    ],
    ids=["executor", "workers-zero", "workers-word", "cpus", "address-local", "gpus-local", "gpus-negative", "retries"],
)
def test_executor_config_errors_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        ExecutorConfig(**fields)


GiB = 1024**3


def machine(monkeypatch, cores: int, memory_gib: float, device: str = "cpu") -> None:
    """Pretend the executor runs on `cores` cores with `memory_gib` of memory and `device` (2 cores and
    2 GiB per auto worker)."""
    monkeypatch.setattr(executors, "cpu_count", lambda: cores)
    monkeypatch.setattr(executors, "memory_bytes", lambda: int(memory_gib * GiB))
    monkeypatch.setattr(executors, "resolve_device", lambda _: torch.device(device))


def test_auto_workers_give_each_run_the_measured_share_of_cores(monkeypatch):
    machine(monkeypatch, cores=16, memory_gib=64)  # room for 8 workers of 2 cores, 32 of 2 GiB
    assert ExecutorConfig().num_workers(100, "cpu") == 8
    assert ExecutorConfig().num_workers(1, "cpu") == 1  # never more workers than runs
    assert ExecutorConfig(cpus_per_run=16).num_workers(8, "cpu") == 1
    assert ExecutorConfig(cpus_per_run=1).num_workers(100, "cpu") == 16
    assert ExecutorConfig(workers="3").num_workers(8, "cpu") == 3
    assert ExecutorConfig(executor="ray").num_workers(40, "cpu") == 40  # Ray schedules them by their resources
    assert ExecutorConfig(executor="ray").threads_per_run(40) == 2
    assert ExecutorConfig(executor="ray", workers="4").threads_per_run(4) == 4  # 16 cores over 4 workers
    assert ExecutorConfig().threads_per_run(1) is None  # one local worker keeps torch's own thread count
    assert ExecutorConfig().threads_per_run(2) == 8
    assert ExecutorConfig().threads_per_run(3) == 5  # 16 // 3: never more threads than cores
    assert ExecutorConfig(cpus_per_run=2).threads_per_run(4) == 2


def test_auto_workers_are_bounded_by_memory_and_never_zero(monkeypatch):
    machine(monkeypatch, cores=16, memory_gib=5)  # 8 workers by cores, but 2 GiB each fits only 2
    assert ExecutorConfig().num_workers(100, "cpu") == 2
    machine(monkeypatch, cores=1, memory_gib=1)  # not even one worker's share: still one worker
    assert ExecutorConfig().num_workers(100, "cpu") == 1
    assert ExecutorConfig().threads_per_run(4) == 1


def test_auto_workers_on_a_gpu_are_one(monkeypatch):
    machine(monkeypatch, cores=16, memory_gib=64, device="cuda")  # one process owns the GPU
    assert ExecutorConfig().num_workers(100, "cuda") == 1


def test_study_command_reports_missing_ray(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if `softprompt[ray]` were not installed
    config = tmp_path / "tiny.toml"
    config.write_text(study_toml(tiny_model_dir))
    result = CliRunner().invoke(app, ["study", str(config), "--out", str(tmp_path / "o"), "--data-dir", str(FIXTURE_DATA), "--executor", "ray"])
    assert result.exit_code == 2
    assert "--executor ray needs Ray: pip install 'softprompt[ray]'" in result.output
