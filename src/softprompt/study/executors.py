"""Where a study's training runs execute: in this process, in local worker processes, or as Ray tasks.

Every executor runs the same function on each run, `train_run`: take the run folder's lock, skip
the run if it is done, resume it if it is unfinished, train it otherwise. So a worker that dies
mid-run and is retried continues from the run's last checkpoint, and a driver that is killed and
re-run finds finished runs done. Results do not depend on the executor: a run's prompt is a
function of its config and its torch thread count (CPU reductions round by thread count), which
`--cpus-per-run` fixes for every executor alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing import get_context
from pathlib import Path

import torch

from softprompt.backbones.loading import Backbone, load_backbone, resolve_device
from softprompt.io.locks import RunLock
from softprompt.io.runs import RUN_FILE, is_done
from softprompt.train.config import TrainConfig
from softprompt.train.loop import TrainingDiverged, train
from softprompt.flags import flag_help

# Threads or workers, measured by bench/bench_workers.py on this project's 2-core machine (idle, bench/workers.json):
# four CB runs took 117 s as one process at 2 threads, one after another, and 131 s as two single-thread workers
# side by side (each run at half the speed: the two share memory bandwidth). So `auto` gives each run 2 cores:
# one in-process run on 2 cores, one worker per 2 cores on larger machines.
THREADS_PER_AUTO_WORKER = 2
MEMORY_PER_WORKER_BYTES = 2 * 1024**3  # a SmolLM2-135M worker peaks near 1.2 GB; leave room


class ExecutorKind(str, Enum):
    LOCAL = "local"  # this machine: in this process (1 worker) or in worker processes
    RAY = "ray"  # one Ray task per run, on a local Ray or a cluster (`pip install softprompt[ray]`)


@dataclass(frozen=True)
class ExecutorConfig:
    executor: ExecutorKind = field(default=ExecutorKind.LOCAL, metadata=flag_help("local: this machine; ray: one Ray task per run."))
    workers: str = field(
        default="auto", metadata=flag_help("Runs trained at once: N, or auto (on CPU one 2-thread run per 2 cores, measured faster than 1-thread workers; on a GPU 1).")
    )
    ray_address: str | None = field(default=None, metadata=flag_help("Ray cluster to join (`ray start --head` prints it); default: a local Ray."))
    cpus_per_run: int | None = field(default=None, metadata=flag_help("Torch threads (and Ray CPUs) per run; default: cores / workers."))
    gpus_per_run: float = field(default=0.0, metadata=flag_help("GPUs per run (Ray only; 0 trains on CPU)."))
    max_retries: int = field(default=2, metadata=flag_help("Retries of a run whose worker died; a retry resumes from the run's checkpoint."))

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "executor", ExecutorKind(self.executor))
        except ValueError:
            raise ValueError(f"--executor must be one of local, ray, got {self.executor!r}") from None
        workers = str(self.workers)
        if workers != "auto" and not (workers.isdigit() and int(workers) >= 1):
            raise ValueError(f"--workers must be a whole number of at least 1 or auto, got {self.workers!r}")
        object.__setattr__(self, "workers", workers)
        if self.cpus_per_run is not None and self.cpus_per_run < 1:
            raise ValueError(f"--cpus-per-run must be at least 1, got {self.cpus_per_run}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if not self.gpus_per_run >= 0:
            raise ValueError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run}")
        if self.executor is ExecutorKind.LOCAL and (self.ray_address is not None or self.gpus_per_run):
            flag = "--ray-address" if self.ray_address is not None else "--gpus-per-run"
            raise ValueError(f"{flag} needs --executor ray; the local executor trains on --device")

    def num_workers(self, num_runs: int, device: str) -> int:
        """Runs at once. auto: under Ray every run (Ray schedules them by --cpus-per-run / --gpus-per-run);
        locally one run per `THREADS_PER_AUTO_WORKER` cores (memory allowing) on CPU, and 1 on a GPU."""
        if self.workers != "auto":
            return int(self.workers)
        if self.executor is ExecutorKind.RAY:
            return num_runs
        if resolve_device(device).type != "cpu":
            return 1  # one process owns the GPU; runs at once would contend for it
        per_worker = self.cpus_per_run or THREADS_PER_AUTO_WORKER
        return max(1, min(num_runs, cpu_count() // per_worker, memory_bytes() // MEMORY_PER_WORKER_BYTES))

    def threads_per_run(self, workers: int) -> int | None:
        """Torch threads of each run: `cpus_per_run`, else the cores shared out (Ray: 1 unless told);
        None keeps torch's default (one local worker: today's behaviour)."""
        if self.cpus_per_run is not None:
            return self.cpus_per_run
        if self.executor is ExecutorKind.RAY:
            return THREADS_PER_AUTO_WORKER if self.workers == "auto" else max(1, cpu_count() // workers)
        return None if workers == 1 else max(1, cpu_count() // workers)


@dataclass(frozen=True)
class RunJob:
    """One training run for a worker: everything it needs, as plain picklable values (absolute paths)."""

    name: str
    config: TrainConfig
    run_dir: str
    data_dir: str | None
    label: str = ""  # what progress lines call it: "run 3/8: rte seed 0"
    threads: int | None = None  # torch threads; None leaves the process's setting


@dataclass(frozen=True)
class RunOutcome:
    name: str
    status: str  # done, diverged, skipped (already done when the worker got the lock)
    host: str
    pid: int
    resumed: bool = False
    val_accuracy: float | None = None
    wall_s: float | None = None
    error: str | None = None


_BACKBONES: dict[tuple[str, ...], Backbone] = {}  # a worker process loads each backbone once, for all its runs


def worker_backbone(model: str, device: str, dtype: str = "auto", attention: str = "auto") -> Backbone:
    key = (model, device, dtype, attention)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(model, device, dtype, attention)
    return _BACKBONES[key]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_run(job: RunJob, backbone: Backbone | None = None, progress: bool = False) -> RunOutcome:
    """Train one run under its folder's lock: skip it if done, resume it if unfinished.

    Waits while another process holds the lock (it is training this very run), then finds it done.
    """
    run_dir, me = Path(job.run_dir), {"host": socket.gethostname(), "pid": os.getpid()}
    with RunLock(run_dir, timeout_s=None):
        if is_done(run_dir):
            return RunOutcome(job.name, "skipped", **me)
        resumed = (run_dir / RUN_FILE).is_file()  # killed or crashed: continue from its last checkpoint
        with torch_threads(job.threads):
            backbone = backbone or worker_backbone(job.config.model, job.config.device, job.config.dtype, job.config.attention)
            try:
                record = train(job.config, run_dir, backbone=backbone, data_dir=job.data_dir, progress=progress, resume=resumed)
            except TrainingDiverged as e:
                return RunOutcome(job.name, "diverged", **me, resumed=resumed, error=str(e))
    return RunOutcome(job.name, record["status"], **me, resumed=resumed, val_accuracy=record["val"]["accuracy"], wall_s=record["wall_s"])


def run_jobs(
    jobs: list[RunJob], executor: ExecutorConfig, backbone: Backbone | None, echo: Callable[[str], None], progress: bool = False
) -> dict[str, RunOutcome]:
    """Train `jobs` with `executor`; {run name: outcome}. `backbone` serves in-process runs only.

    Raises:
        FileNotFoundError: a run finished on a worker but its folder is not visible here (no shared storage).
        RuntimeError: a run's worker died more than `max_retries` times.
    """
    if not jobs:
        return {}
    device = jobs[0].config.device
    workers = executor.num_workers(len(jobs), device)
    jobs = [dataclasses.replace(job, threads=executor.threads_per_run(workers)) for job in jobs]
    if executor.executor is ExecutorKind.RAY:
        outcomes = _run_on_ray(jobs, executor, workers, echo)
    elif workers == 1:
        outcomes = _run_in_process(jobs, backbone, echo, progress)
    else:
        outcomes = _run_in_processes(jobs, executor, workers, echo)
    check_runs_visible(jobs, outcomes)
    return outcomes


def _describe(job: RunJob, outcome: RunOutcome, where: bool) -> str:
    label = (job.label or job.name) + (" (resumed)" if outcome.resumed and where else "")
    worker = f" (pid {outcome.pid} on {outcome.host})" if where else ""
    if outcome.status == "done":
        return f"{label}: val accuracy {outcome.val_accuracy:.1f} in {outcome.wall_s:.0f} s{worker}"
    if outcome.status == "diverged":
        return f"{label} diverged ({outcome.error}); left out of the analyses"
    return f"{label}: finished meanwhile by another process, skipped"


def _run_in_process(jobs: list[RunJob], backbone: Backbone | None, echo: Callable[[str], None], progress: bool) -> dict[str, RunOutcome]:
    outcomes = {}
    for job in jobs:
        echo((job.label or job.name) + (" (unfinished, resuming)" if (Path(job.run_dir) / RUN_FILE).is_file() else ""))
        outcomes[job.name] = train_run(job, backbone, progress)
        echo(_describe(job, outcomes[job.name], where=False))
    return outcomes


def _run_in_processes(jobs: list[RunJob], executor: ExecutorConfig, workers: int, echo: Callable[[str], None]) -> dict[str, RunOutcome]:
    """A pool of `workers` spawned processes; when a worker dies the pool is rebuilt and its runs retried."""
    outcomes: dict[str, RunOutcome] = {}
    pending, attempts = list(jobs), {job.name: 0 for job in jobs}
    echo(f"training {len(jobs)} runs on {workers} local worker processes ({jobs[0].threads} torch threads each)")
    while pending:
        with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_run, job): job for job in pending}
            broken = []
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    job = futures.pop(future)
                    try:
                        outcomes[job.name] = future.result()
                        echo(_describe(job, outcomes[job.name], where=True))
                    except BrokenProcessPool:  # a worker died (SIGKILL, out of memory): every unfinished run is retried
                        broken.append(job)
        pending = broken
        for job in pending:
            attempts[job.name] += 1
            if attempts[job.name] > executor.max_retries:
                raise RuntimeError(f"run {job.name}: its worker died {attempts[job.name]} times; see {job.run_dir}, or raise --max-retries")
        if pending:
            echo(f"a worker died; retrying {', '.join(j.name for j in pending)} (each resumes from its checkpoint)")
    return outcomes


def _run_on_ray(jobs: list[RunJob], executor: ExecutorConfig, workers: int, echo: Callable[[str], None]) -> dict[str, RunOutcome]:
    """One Ray task per run, at most `workers` in flight; Ray retries a task whose worker died."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        t0 = time.time()
        if executor.ray_address is None:  # a local Ray: room for `workers` runs, or all the cores for auto
            cpus = None if executor.workers == "auto" else workers * jobs[0].threads
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=executor.ray_address, log_to_driver=False)
        echo(f"ray: connected in {time.time() - t0:.1f} s to {ray.get_runtime_context().gcs_address}")
    task = ray.remote(
        num_cpus=jobs[0].threads, num_gpus=executor.gpus_per_run, max_retries=executor.max_retries, retry_exceptions=False
    )(train_run)
    outcomes: dict[str, RunOutcome] = {}
    waiting, in_flight = list(jobs), {}
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < workers:
                job = waiting.pop(0)
                in_flight[task.remote(job)] = job
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            job = in_flight.pop(ready[0])
            try:
                outcomes[job.name] = ray.get(ready[0])
            except ray.exceptions.RayTaskError:
                raise  # the run's own error (a ValueError stays a ValueError): the message names the fix
            except ray.exceptions.RayError as e:  # its worker died (killed, out of memory, node lost) every time it ran
                raise RuntimeError(f"run {job.name}: its Ray worker died {executor.max_retries + 1} times; see {job.run_dir} ({e})") from None
            echo(_describe(job, outcomes[job.name], where=True))
    finally:
        if started:
            ray.shutdown()
    return outcomes


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install 'softprompt[ray]'") from None
    return ray


def check_runs_visible(jobs: list[RunJob], outcomes: dict[str, RunOutcome]) -> None:
    """Every run a worker finished must be readable here; on a cluster that takes storage every node sees.

    Raises:
        FileNotFoundError: names the run, the worker's host and the fix.
    """
    for job in jobs:
        outcome = outcomes[job.name]
        if outcome.status in ("done", "skipped") and not is_done(Path(job.run_dir)):
            raise FileNotFoundError(
                f"run {job.name} finished on {outcome.host} (pid {outcome.pid}), but {job.run_dir} holds no finished run here: "
                f"put the study folder on storage every node mounts at the same path (NFS, a shared disk), or copy the runs back"
            )


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3
