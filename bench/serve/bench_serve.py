"""`softprompt serve` under load: mixed-task batching against one request per forward and PEFT adapter switching.

    python bench/serve/bench_serve.py --out bench/results-serve.json        (or: make bench-serve)

One process loads SmolLM2 once and starts three servers in turn on 127.0.0.1 (uvicorn in a thread,
the real HTTP stack), each driven by an async httpx load generator at concurrency 1, 8 and 32 with
requests spread round-robin over 4 task prompts (CB, RTE, COPA, WSC val rows, one input each):

  batched   softprompt serve: --max-batch 32 --max-wait-ms 10, rows of different prompts in one forward
  single    the same server at --max-batch 1: one request per forward (what a naive server does)
  peft      one adapter at a time: a PeftModel holding the 4 prompts as adapters, `set_adapter` per
            request, then PEFT's forward on one row per choice (full-sequence logits), --max-batch 1

The prompts are each task's text init (its good-prompt text as token embeddings, so lengths differ
per task), saved as run folders: untrained, which changes no cost. Every side must give the same
choice for every request, and log-likelihoods within 1e-4 (asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from softprompt.backbones.loading import DEFAULT_MODEL, Backbone, load_backbone
from softprompt.core.prompt import embed_text
from softprompt.data.batch import pad
from softprompt.io.peft import export_peft
from softprompt.io.runs import atomic_write_json, provenance, save_prompt
from softprompt.serve.app import create_app
from softprompt.serve.bank import load_bank
from softprompt.serve.config import ServeConfig
from softprompt.serve.engine import ScoreJob
from softprompt.serve.server import ServerThread
from softprompt.tasks.registry import TASKS, read_jsonl, resolve_data_dir

BENCH_TASKS = ("cb", "rte", "copa", "wsc")


def write_prompts(backbone: Backbone, folder: Path) -> dict[str, Path]:
    """Each task's text-init prompt as a finished run folder, and as a PEFT adapter beside it."""
    runs = {}
    for name in BENCH_TASKS:
        prompt = embed_text(backbone.model, backbone.tokenizer, TASKS[name].init_text)
        run = folder / name
        save_prompt(run / "prompt.safetensors", prompt, {"task": name, "init": "text", "model": backbone.name})
        atomic_write_json(run / "run.json", {"status": "done", "task": name, "model": backbone.name})
        export_peft(run, folder / f"{name}-peft")
        runs[name] = run
    return runs


def requests_for(data_dir: Path | None, per_task: int) -> list[dict]:
    """Val rows round-robin over the tasks, one input per request (the label is left out)."""
    rows = {t: [row for _, row in read_jsonl(resolve_data_dir(data_dir) / TASKS[t].folder / "val.jsonl")[:per_task]] for t in BENCH_TASKS}
    out = []
    for i in range(per_task):
        for task in BENCH_TASKS:
            row = {k: v for k, v in rows[task][i].items() if k in TASKS[task].fields and k != "label"}
            out.append({"prompt": task, "inputs": [row]})
    return out


def peft_run(backbone: Backbone, folder: Path):
    """What the model thread runs for the `peft` side: `set_adapter` per job, one row per choice."""
    model = PeftModel.from_pretrained(backbone.model, folder / f"{BENCH_TASKS[0]}-peft", adapter_name=BENCH_TASKS[0])
    for name in BENCH_TASKS[1:]:
        model.load_adapter(folder / f"{name}-peft", adapter_name=name)
    model.eval()
    names = [None] + list(BENCH_TASKS)  # bank order: the bare backbone first

    @torch.inference_mode()
    def run(kind: str, jobs: list[ScoreJob]) -> list[torch.Tensor]:
        out = []
        for job in jobs:
            model.set_adapter(names[job.prompt_of[0]])
            num_virtual = model.peft_config[names[job.prompt_of[0]]].num_virtual_tokens
            result = torch.full((len(job.items), max(len(i.choices) for i in job.items)), float("-inf"))
            for e, item in enumerate(job.items):
                ids, mask = pad([item.context + choice for choice in item.choices], backbone.tokenizer.pad_token_id)
                logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # [C, P+T, V]
                for c, choice in enumerate(item.choices):
                    at = num_virtual + len(item.context) - 1  # the position predicting the choice's first token
                    result[e, c] = sum(logprobs[c, at + j, token] for j, token in enumerate(choice))
            out.append(result)
        return out

    return run


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def drive(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], list[dict], float]:
    """Send every body, `concurrency` at a time; (latencies, answers in order, wall seconds)."""
    latencies, answers = [0.0] * len(bodies), [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker():
            for i in next_index:
                started = time.perf_counter()
                response = await client.post("/v1/classify", json=bodies[i])
                latencies[i] = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"request {i} got {response.status_code}: {response.text}")
                answers[i] = response.json()["results"][0]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, answers, time.perf_counter() - started


def measure(app, config: ServeConfig, bodies: list[dict], levels: list[int], requests_per_level) -> dict:
    out = {}
    with ServerThread(app, config) as server:
        asyncio.run(drive(server.url, bodies[:4], 1))  # warm-up: every prompt once
        for concurrency in levels:
            sent = bodies[: requests_per_level(concurrency)]
            rows, batches = metric(server.url, "softprompt_batch_rows_sum"), metric(server.url, "softprompt_batch_rows_count")
            latencies, answers, wall = asyncio.run(drive(server.url, sent, concurrency))
            rows = metric(server.url, "softprompt_batch_rows_sum") - rows
            batches = metric(server.url, "softprompt_batch_rows_count") - batches
            ordered = sorted(latencies)
            out[concurrency] = {
                "requests": len(sent), "wall_s": wall, "requests_per_s": len(sent) / wall,
                "p50_ms": 1000 * statistics.median(ordered),
                "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
                "mean_batch_rows": rows / max(batches, 1), "answers": answers,
            }
            print(f"  concurrency {concurrency}: {out[concurrency]['requests_per_s']:.2f} req/s", flush=True)
    return out


def check_same(results: dict) -> dict[str, float]:
    """Assert every side chose as `batched` did for every request; the largest log-likelihood gap per side.

    `single` runs the same code on other batches (gap from float rounding only, asserted under 1e-4);
    `peft` computes full-sequence logits another way (asserted under 1e-3 on sums of ~10-60 nats).
    """
    gaps = {}
    base = results["batched"]
    for side, levels in results.items():
        gap = 0.0
        for concurrency, cell in levels.items():
            for i, (a, b) in enumerate(zip(cell["answers"], base[concurrency]["answers"])):
                assert a["choice"] == b["choice"], f"{side} at concurrency {concurrency}, request {i}: {a} vs {b}"
                gap = max(gap, max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])))
        assert gap < (1e-3 if side == "peft" else 1e-4), f"{side}: log-likelihoods differ from batched by {gap}"
        gaps[side] = gap
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="Requests per level = rounds x max(concurrency, 4).")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.model, "auto")
    per_level = lambda c: args.rounds * max(c, 4)  # noqa: E731
    bodies = requests_for(args.data_dir, -(-per_level(max(args.concurrency)) // len(BENCH_TASKS)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = write_prompts(backbone, folder)
        bank = load_bank(backbone, list(runs.items()))
        lengths = {entry.name: entry.num_tokens for entry in bank[1:]}
        sides = {
            "batched": (ServeConfig(port=0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms), None),
            "single": (ServeConfig(port=0, max_batch=1, max_wait_ms=0), None),
            "peft": (ServeConfig(port=0, max_batch=1, max_wait_ms=0), "peft"),
        }
        for side, (config, run) in sides.items():
            print(f"{side}:", flush=True)
            run = peft_run(backbone, folder) if run == "peft" else None
            results[side] = measure(create_app(backbone, bank, config, run), config, bodies, args.concurrency, per_level)
    gaps = check_same(results)
    print(f"\nprompt lengths {lengths}; {backbone.name} on {backbone.device}, {torch.get_num_threads()} threads; "
          f"same choices on every side; largest log-likelihood gap to batched: "
          + ", ".join(f"{side} {gap:.1e}" for side, gap in gaps.items()))
    print(f"{'side':<9}{'conc':>5}{'reqs':>6}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'rows/fwd':>10}{'vs single':>11}")
    for side, levels in results.items():
        for c, cell in levels.items():
            ratio = cell["requests_per_s"] / results["single"][c]["requests_per_s"]
            print(f"{side:<9}{c:>5}{cell['requests']:>6}{cell['requests_per_s']:>8.2f}{cell['p50_ms']:>9.0f}"
                  f"{cell['p99_ms']:>9.0f}{cell['mean_batch_rows']:>10.1f}{ratio:>10.2f}x")
    if args.out is not None:
        summary = {side: {c: {k: v for k, v in cell.items() if k != "answers"} for c, cell in levels.items()}
                   for side, levels in results.items()}
        atomic_write_json(args.out, {"command": " ".join(sys.argv), "prompt_lengths": lengths, "max_logprob_gap": gaps,
                                     "results": summary, "provenance": provenance()})


if __name__ == "__main__":
    main()
