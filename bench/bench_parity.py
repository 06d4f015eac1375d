"""Do bf16 weights change the reported numbers? fp32 against bf16 scoring on whole val splits.

    python bench/bench_parity.py --out bench/parity.json [--prompt cb=runs/quick/cb-s0 ...]

For each task (CB, RTE, COPA, WSC by default: their whole val splits) and each prompt (none, the task's
text init, and any trained prompt given with --prompt TASK=SOURCE), both dtypes score the same items:
how many rank-classification predictions and exact-match answers flip, each flip's fp32 margin between
its top two choices, and the largest |bf16 - fp32| change of any example's top-two margin. The last is
what a "bf16 to find, fp32 to judge" bound must exceed. Timings: each dtype's scoring time, and the
bf16 scoring plus the fp32 re-scoring of the examples within the bound (`--bound`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_fastpath import JUDGE_MARGIN  # the margin bench_fastpath judges within (bench/ is on sys.path)
from softprompt.backbones.fastpath import cpu_hardware
from softprompt.backbones.loading import DEFAULT_MODEL, load_backbone
from softprompt.core.prompt import embed_text, from_embedded_text
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import get_task, load_examples

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"


def top_two_margin(logprobs: torch.Tensor) -> torch.Tensor:
    """`[E, C]` summed log-likelihoods -> `[E]` best minus second best (-inf choices ignored)."""
    top = logprobs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(fp32, bf16, prompt, items, bound: float, batch_size: int) -> dict:
    exact, t32 = timed(lambda: score(fp32, prompt, items, batch_size))
    fast, t16 = timed(lambda: score(bf16, prompt, items, batch_size))
    m32, m16 = top_two_margin(exact.logprobs[0]), top_two_margin(fast.logprobs[0])
    flips = (exact.predictions()[0] != fast.predictions()[0]).nonzero().flatten().tolist()
    near = (m16 <= bound).nonzero().flatten().tolist()
    judged = fast.predictions()[0].clone()
    trescore = 0.0
    if near:
        rescored, trescore = timed(lambda: score(fp32, prompt, [items[i] for i in near], batch_size))
        judged[near] = rescored.predictions()[0]
    labels = exact.labels
    return {
        "n": len(items),
        "accuracy_fp32": 100 * float((exact.predictions()[0] == labels).float().mean()),
        "accuracy_bf16": 100 * float((fast.predictions()[0] == labels).float().mean()),
        "prediction_flips": len(flips),
        "flip_fp32_margins": [round(float(m32[i]), 5) for i in flips],
        "exact_match_flips": int((exact.exact[0] != fast.exact[0]).sum()),
        "max_margin_change": float((m16 - m32).abs().max()),
        "max_logprob_change": float((fast.logprobs[0] - exact.logprobs[0]).nan_to_num(0, 0, 0).abs().max()),
        "rescored_within_bound": len(near),
        "judged_identical_to_fp32": bool((judged == exact.predictions()[0]).all()),
        "seconds_fp32": t32,
        "seconds_bf16": t16,
        "seconds_bf16_plus_rescore": t16 + trescore,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["cb", "rte", "copa", "wsc"])
    parser.add_argument("--prompt", action="append", default=[], help="TASK=SOURCE: a trained prompt to compare too")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bound", type=float, default=JUDGE_MARGIN, help="re-score in fp32 where the bf16 margin is at most this")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/parity.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = load_backbone(args.model, "cpu", "float32")
    bf16 = load_backbone(args.model, "cpu", "bfloat16", score_in_float32=False)  # raw bf16: the judging is measured here
    trained = dict(item.split("=", 1) for item in args.prompt)
    results = {"cpu": cpu_hardware().to_json(), "threads": args.threads, "model": args.model, "bound": args.bound,
               "attention": {"float32": fp32.model.config._attn_implementation, "bfloat16": bf16.model.config._attn_implementation},
               "tasks": {}}
    for name in args.tasks:
        task = get_task(name)
        items = [encode(fp32.tokenizer, e, 1024) for e in load_examples(task, "val", args.data_dir)]
        prompts = {"none": None, "text": from_embedded_text(embed_text(fp32.model, fp32.tokenizer, task.init_text), 20)}
        if name in trained:
            prompts["trained"] = load_prompt_source(trained[name]).prompt
        results["tasks"][name] = {}
        for mode, prompt in prompts.items():
            row = compare(fp32, bf16, prompt, items, args.bound, args.batch_size)
            results["tasks"][name][mode] = row
            print(name, mode, {k: v for k, v in row.items() if k != "flip_fp32_margins"}, flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
