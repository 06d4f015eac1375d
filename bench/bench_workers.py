"""Threads or workers: the same training runs as one process at N torch threads, or N single-thread workers.

    python bench/bench_workers.py --out bench/workers.json [--runs 4] [--steps 3] [--ray]

Both sides go through the study's own executors (`softprompt.study.executors.run_jobs`), on the
same runs: CB on SmolLM2-135M, batches of 8, `--steps` optimizer steps each, a 32-example dev slice
scored at the epoch's end and the 56 val examples at the run's end (every run a study trains does
all three). Each side trains into its own fresh folder:
  threads  one process, the runs one after another, torch at `cores` threads (today's default);
  workers  `cores` spawned worker processes of one torch thread each, side by side; their wall
           time includes starting them and loading the model in each;
  ray      (--ray) the same on a local Ray (2 CPUs, no dashboard): ray.init, worker start-up and
           model load count, and are also reported alone.
Prompt checksums are compared across sides: a run's prompt is a function of its torch thread
count, so `threads` (N threads) may differ from `workers` in the last bits, while `workers` and
`ray` (one thread each) must be identical. Other processes on the machine skew every number: on a
shared machine compare the ratio, and rerun on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import atomic_write_json, load_prompt, tensor_sha256
from softprompt.study.executors import ExecutorConfig, RunJob, cpu_count, run_jobs
from softprompt.tasks.registry import resolve_data_dir
from softprompt.train.config import TrainConfig


def jobs(root: Path, runs: int, steps: int) -> list[RunJob]:
    data_dir = str(resolve_data_dir(None).resolve())
    configs = [TrainConfig(task="cb", seed=seed, batch_size=8, epochs=1, max_steps=steps, device="cpu") for seed in range(runs)]
    return [RunJob(f"cb-s{c.seed}", c, str(root / f"cb-s{c.seed}"), data_dir, f"run {c.seed + 1}/{runs}: cb seed {c.seed}") for c in configs]


def side(name: str, executor: ExecutorConfig, root: Path, runs: int, steps: int, backbone=None) -> dict:
    todo = jobs(root / name, runs, steps)
    started = time.perf_counter()
    outcomes = run_jobs(todo, executor, backbone, lambda line: print(f"  [{name}] {line}", flush=True))
    wall = time.perf_counter() - started
    prompts = {job.name: tensor_sha256(load_prompt(Path(job.run_dir))[0])[:16] for job in todo}
    run_walls = [o.wall_s for o in outcomes.values()]
    print(f"{name}: {wall:.1f} s for {runs} runs (runs' own wall times {run_walls})", flush=True)
    return {"wall_s": round(wall, 2), "run_wall_s": run_walls, "prompt_sha256": prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/workers.json"))
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also time a local Ray with the same workers")
    args = parser.parse_args()
    cores = cpu_count()
    result = {"cores": cores, "runs": args.runs, "steps": args.steps, "platform": platform.platform(), "torch": torch.__version__,
              "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        backbone = load_backbone("smollm2-135m-instruct", "cpu")
        result["model_load_s"] = round(time.perf_counter() - t0, 2)
        torch.set_num_threads(cores)
        result["threads"] = side("threads", ExecutorConfig(workers="1", cpus_per_run=cores), root, args.runs, args.steps, backbone)
        del backbone
        result["workers"] = side("workers", ExecutorConfig(workers=str(cores), cpus_per_run=1), root, args.runs, args.steps)
        if args.ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            result["ray_init_s"] = round(time.perf_counter() - t0, 2)
            executor = ExecutorConfig(executor="ray", workers=str(cores), cpus_per_run=1)
            result["ray"] = side("ray", executor, root, args.runs, args.steps)
            ray.shutdown()
    result["load_avg_after"] = os.getloadavg()
    result["speedup_workers_over_threads"] = round(result["threads"]["wall_s"] / result["workers"]["wall_s"], 3)
    result["same_prompts_threads_workers"] = result["threads"]["prompt_sha256"] == result["workers"]["prompt_sha256"]
    if args.ray:
        result["same_prompts_workers_ray"] = result["workers"]["prompt_sha256"] == result["ray"]["prompt_sha256"]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
