"""`softprompt serve` under load: mixed-task batching against one request per forward and PEFT adapter switching,
in each dtype the fast path serves in.

    python bench/serve/bench_serve.py --out bench/results-serve.json        (or: make bench-serve)
    python bench/serve/bench_serve.py --quick                              (a smoke run: about 30 s)

One process loads SmolLM2 once per `--dtypes` entry as `softprompt serve --dtype D` does (`load_backbone(...,
D).scoring()`: fp32 serves in fp32, bfloat16 in bf16, attention chosen by the fast path's `auto` for that dtype)
and starts, for each dtype, these servers on 127.0.0.1 (uvicorn in a thread, the real HTTP stack), each driven by
an async httpx load generator at concurrency 1, 8 and 32 with requests spread round-robin over 4 task prompts
(CB, RTE, COPA, WSC val rows, one input each):

  batched   softprompt serve: one server per (--max-batch, --max-wait-ms) pair of the comma lists, rows of
            different prompts in one forward
  single    the same server at --max-batch 1: one request per forward (what a naive server does)
  peft      one adapter at a time: a PeftModel on the same base (bf16 base for bf16: PEFT gets its fastest dtype
            too) holding the 4 prompts as adapters, `set_adapter` per request, then PEFT's forward on one row
            per choice (full-sequence logits), --max-batch 1

Every server runs `--repeats` times, the servers' order rotating each repeat; requests/s is the median over
repeats, latency percentiles pool every repeat's requests. The prompts are each task's text init (its
good-prompt text as fp32 token embeddings, so lengths differ per task), saved once as run folders: untrained,
which changes no cost. fp32 servers must give the first fp32 batched server's choice for every request and
log-likelihoods within 1e-4 (peft: 1e-3; asserted). Servers in other dtypes are not asserted against fp32: the
JSON records, per dtype and server, how many answers chose otherwise and the largest log-likelihood gap.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from softprompt.backbones.fastpath import cpu_hardware
from softprompt.backbones.loading import DEFAULT_MODEL, DTYPES, Backbone, load_backbone
from softprompt.core.prompt import embed_text
from softprompt.data.batch import pad
from softprompt.io.peft import export_peft
from softprompt.io.runs import atomic_write_json, provenance, save_prompt
from softprompt.serve.app import create_app
from softprompt.serve.bank import BankEntry, load_bank
from softprompt.serve.config import ServeConfig
from softprompt.serve.engine import ScoreJob
from softprompt.serve.server import ServerThread
from softprompt.tasks.registry import TASKS, read_jsonl, resolve_data_dir

BENCH_TASKS = ("cb", "rte", "copa", "wsc")
REFERENCE_DTYPE = "float32"  # every other dtype's answers are compared with this dtype's first batched server
QUICK = {"concurrency": [1], "rounds": 1, "repeats": 1}  # --quick: 4 requests per server, one pass


@dataclass(frozen=True)
class Server:
    """One server the bench drives: its side, the backbone's dtype and the batcher's settings."""

    side: str  # batched, single or peft
    dtype: str
    max_batch: int
    max_wait_ms: float

    @property
    def label(self) -> str:
        knobs = f" batch {self.max_batch} wait {self.max_wait_ms:g} ms" if self.side == "batched" else ""
        return f"{self.side} {self.dtype}{knobs}"

    def config(self) -> ServeConfig:
        return ServeConfig(port=0, max_batch=self.max_batch, max_wait_ms=self.max_wait_ms, dtype=self.dtype)


@dataclass
class Served:
    """What one dtype's servers share: the serving backbone, its prompt bank, and PEFT's model-thread function."""

    backbone: Backbone
    bank: list[BankEntry]
    peft: Callable


def servers_for(dtypes: list[str], max_batches: list[int], max_waits_ms: list[float]) -> list[Server]:
    """Per dtype: a batched server per (max_batch, max_wait_ms) pair, then single and peft (one request per forward)."""
    out = []
    for dtype in dtypes:
        out += [Server("batched", dtype, b, w) for b in max_batches for w in max_waits_ms]
        out += [Server("single", dtype, 1, 0.0), Server("peft", dtype, 1, 0.0)]
    return out


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


def measure_once(app, config: ServeConfig, bodies: list[dict], levels: list[int], requests_per_level) -> dict[int, dict]:
    """One pass of one server over every concurrency level: latencies, answers, wall seconds, rows and forwards."""
    out = {}
    with ServerThread(app, config) as server:
        asyncio.run(drive(server.url, bodies[:4], 1))  # warm-up: every prompt once
        for concurrency in levels:
            sent = bodies[: requests_per_level(concurrency)]
            rows, batches = metric(server.url, "softprompt_batch_rows_sum"), metric(server.url, "softprompt_batch_rows_count")
            latencies, answers, wall = asyncio.run(drive(server.url, sent, concurrency))
            out[concurrency] = {"latencies": latencies, "answers": answers, "wall_s": wall,
                                "rows": metric(server.url, "softprompt_batch_rows_sum") - rows,
                                "batches": metric(server.url, "softprompt_batch_rows_count") - batches}
            print(f"  concurrency {concurrency}: {len(sent) / wall:.2f} req/s", flush=True)
    return out


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values, `q` in [0, 1]."""
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(passes: list[dict[int, dict]]) -> dict[int, dict]:
    """Per concurrency: requests/s per pass and their median, p50/p95/p99 over every pass's requests, rows per forward."""
    out = {}
    for concurrency in passes[0]:
        cells = [run[concurrency] for run in passes]
        rates = [len(cell["answers"]) / cell["wall_s"] for cell in cells]
        ordered = sorted(latency for cell in cells for latency in cell["latencies"])
        out[concurrency] = {
            "requests": len(cells[0]["answers"]), "repeats": len(cells), "requests_per_s_median": statistics.median(rates),
            "requests_per_s": rates, "wall_s": [cell["wall_s"] for cell in cells],
            "p50_ms": 1000 * percentile(ordered, 0.50), "p95_ms": 1000 * percentile(ordered, 0.95),
            "p99_ms": 1000 * percentile(ordered, 0.99),
            "mean_batch_rows": sum(cell["rows"] for cell in cells) / max(sum(cell["batches"] for cell in cells), 1),
        }
    return out


def compare(passes: list[dict[int, dict]], reference: dict[int, dict]) -> dict:
    """Every answer of every pass against the reference pass's answer to the same request at the same concurrency."""
    answers, differ, gap = 0, 0, 0.0
    for run in passes:
        for concurrency, cell in run.items():
            for a, b in zip(cell["answers"], reference[concurrency]["answers"]):
                answers, differ = answers + 1, differ + (a["choice"] != b["choice"])
                gap = max(gap, max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])))
    return {"answers": answers, "choices_differ": differ, "max_logprob_gap": gap}


def assert_exact(server: Server, found: dict, reference: Server) -> None:
    """fp32 against fp32: the same choices, log-likelihoods within float rounding.

    batched at other settings and `single` run the same code on other batches (gap from rounding only, under
    1e-4); `peft` computes full-sequence logits another way (under 1e-3 on sums of ~10-60 nats).
    """
    assert found["choices_differ"] == 0, (
        f"{server.label}: {found['choices_differ']} of {found['answers']} answers chose otherwise than {reference.label}")
    bound = 1e-3 if server.side == "peft" else 1e-4
    assert found["max_logprob_gap"] < bound, (
        f"{server.label}: log-likelihoods differ from {reference.label} by {found['max_logprob_gap']:.2e} (bound {bound})")


def load_served(model: str, dtypes: list[str], folder: Path) -> tuple[dict[str, Served], dict[str, int]]:
    """Each dtype's backbone as `serve --dtype D` loads it, the prompts written once from fp32's embeddings."""
    backbones = {dtype: load_backbone(model, "auto", dtype).scoring() for dtype in dtypes}  # serving never trains
    runs = write_prompts(backbones[REFERENCE_DTYPE], folder)
    served = {dtype: Served(b, load_bank(b, list(runs.items())), peft_run(b, folder)) for dtype, b in backbones.items()}
    lengths = {entry.name: entry.num_tokens for entry in served[REFERENCE_DTYPE].bank[1:]}
    return served, lengths


def run_servers(servers: list[Server], served: dict[str, Served], bodies: list[dict], args, per_level) -> dict[Server, list]:
    """Every server once per repeat, the order rotating each repeat; each start gets a fresh app (fresh metrics)."""
    passes = {server: [] for server in servers}
    for rep in range(args.repeats):
        for server in servers[rep % len(servers):] + servers[: rep % len(servers)]:
            print(f"repeat {rep}, {server.label}:", flush=True)
            use, config = served[server.dtype], server.config()
            app = create_app(use.backbone, use.bank, config, use.peft if server.side == "peft" else None)
            passes[server].append(measure_once(app, config, bodies, args.concurrency, per_level))
    return passes


def print_table(results: dict[Server, dict[int, dict]]) -> None:
    print(f"{'server':<38}{'conc':>5}{'reqs':>6}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'rows/fwd':>10}{'vs single':>11}")
    for server, levels in results.items():
        single = results[Server("single", server.dtype, 1, 0.0)]
        for c, cell in levels.items():
            ratio = cell["requests_per_s_median"] / single[c]["requests_per_s_median"]
            print(f"{server.label:<38}{c:>5}{cell['requests']:>6}{cell['requests_per_s_median']:>8.2f}{cell['p50_ms']:>9.0f}"
                  f"{cell['p95_ms']:>9.0f}{cell['mean_batch_rows']:>10.1f}{ratio:>10.2f}x")


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse type for `8,32`-style lists."""
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. 8,32") from None
    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--dtypes", type=comma_list(str), default=["float32", "bfloat16"],
                        help=f"Comma list of backbone dtypes ({', '.join(DTYPES)}); must include {REFERENCE_DTYPE}, the reference.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="Requests per level = rounds x max(concurrency, 4).")
    parser.add_argument("--repeats", type=int, default=3, help="Passes of every server (requests/s: their median).")
    parser.add_argument("--max-batch", type=comma_list(int), default=[32], help="Comma list: one batched server per value (x --max-wait-ms).")
    parser.add_argument("--max-wait-ms", type=comma_list(float), default=[10.0], help="Comma list: one batched server per value (x --max-batch).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: concurrency 1 only, 4 requests per server, one repeat.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if REFERENCE_DTYPE not in args.dtypes or not set(args.dtypes) <= set(DTYPES):
        parser.error(f"--dtypes {','.join(args.dtypes)}: give dtypes among {', '.join(DTYPES)}, including {REFERENCE_DTYPE} "
                     f"(the other dtypes' answers are compared with it), e.g. --dtypes float32,bfloat16")
    if args.quick:
        vars(args).update(QUICK)
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    per_level = lambda c: args.rounds * max(c, 4)  # noqa: E731
    bodies = requests_for(args.data_dir, -(-per_level(max(args.concurrency)) // len(BENCH_TASKS)))
    servers = servers_for(args.dtypes, args.max_batch, args.max_wait_ms)
    with tempfile.TemporaryDirectory() as tmp:
        served, lengths = load_served(args.model, args.dtypes, Path(tmp))
        passes = run_servers(servers, served, bodies, args, per_level)
    reference = next(s for s in servers if s.dtype == REFERENCE_DTYPE and s.side == "batched")
    found = {server: compare(passes[server], passes[reference][0]) for server in servers}
    for server in servers:
        if server.dtype == REFERENCE_DTYPE:
            assert_exact(server, found[server], reference)
    results = {server: summarize(passes[server]) for server in servers}
    hardware = {dtype: use.backbone.hardware() for dtype, use in served.items()}
    cpu = cpu_hardware()
    print(f"\nprompt lengths {lengths}; {args.model} on {cpu.model}, {torch.get_num_threads()} threads; "
          + "; ".join(f"{d}: {h['attention']} attention" for d, h in hardware.items()))
    for server in servers:
        print(f"{server.label}: {found[server]['choices_differ']} of {found[server]['answers']} answers chose otherwise "
              f"than {reference.label}, largest log-likelihood gap {found[server]['max_logprob_gap']:.1e}")
    print_table(results)
    if args.out is not None:
        rows = [{"side": s.side, "dtype": s.dtype, "attention": hardware[s.dtype]["attention"], "max_batch": s.max_batch,
                 "max_wait_ms": s.max_wait_ms, "concurrency": c, **cell} for s, levels in results.items() for c, cell in levels.items()]
        agreement = {}
        for server in servers:
            agreement.setdefault(server.dtype, {})[server.label] = found[server]
        atomic_write_json(args.out, {
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cpu": cpu.to_json(),
            "torch_threads": torch.get_num_threads(), "model": args.model, "backbones": hardware, "prompt_lengths": lengths,
            "repeats": args.repeats, "reference": reference.label, "agreement_with_reference": agreement,
            "results": rows, "provenance": provenance()})


if __name__ == "__main__":
    main()
