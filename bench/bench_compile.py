"""Does `torch.compile` of the decoder layers pay for itself? Compile time against the per-step gain, on one CPU.

    python bench/bench_compile.py --out bench/compile.json

For the two settings `--dtype auto` can pick on a CPU (fp32 with sdpa attention; bf16 with eager), the
same length-bucketed CB training batches as bench_fastpath.py (prompt 20 rows, batch 8: loss_step +
backward) run with the model as it is, then with every decoder layer compiled in place
(`layer.compile(dynamic=True)`, inductor). The first compiled pass pays the compilation of every batch
shape it meets; later passes are steady state. Scoring (CB val under the text prompt, fp32 sdpa, the
numbers `--dtype auto` reports) is timed the same way. Reported per setting: tokens/s (or examples/s)
median over passes, the compiled side's first-pass seconds, the compile overhead (first pass minus a
steady one), the steps a run needs before the gain repays it, and how far the compiled losses or
log-likelihoods are from the uncompiled ones. The JSON names the CPU and the thread count.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import replace

import torch
import torch._dynamo.exc
import torch._dynamo.utils
from bench_fastpath import common_arguments, training_batches  # the same batches as bench_fastpath's training side (bench/ is on sys.path)

from softprompt.backbones.fastpath import cpu_hardware
from softprompt.backbones.loading import Backbone, load_backbone, on_fast_path
from softprompt.core.prompt import embed_text, from_embedded_text
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.loop import loss_step

SETTINGS = [("float32", "sdpa"), ("bfloat16", "eager")]


def copy_on(fp32: Backbone, dtype: str, attention: str, compiled: bool) -> Backbone:
    """Its own copy of the weights in `dtype` with `attention`, the decoder layers compiled when asked."""
    backbone = on_fast_path(replace(fp32, model=copy.deepcopy(fp32.model), reference=None), getattr(torch, dtype), attention,
                            score_in_float32=False)
    if compiled:
        torch._dynamo.reset()  # each side compiles afresh: the layers' code objects are shared between copies
        for layer in backbone.model.model.layers:
            layer.compile(dynamic=True)
    return backbone


def timed_passes(run, passes: int) -> tuple[list[float], list]:
    """Seconds of each pass of `run()` and what each pass returned."""
    seconds, outputs = [], []
    for _ in range(passes):
        start = time.perf_counter()
        outputs.append(run())
        seconds.append(time.perf_counter() - start)
    return seconds, outputs


def bench_training(fp32: Backbone, args) -> dict:
    items, init, batches, tokens = training_batches(fp32, args.data_dir, args.num_tokens, args.train_examples)
    out = {"examples": len(items), "steps_per_pass": len(batches), "tokens_per_pass": tokens, "settings": {}}
    for dtype, attention in SETTINGS:
        sides, graphs = {}, {}
        for compiled in (False, True):
            backbone = copy_on(fp32, dtype, attention, compiled)

            def one_pass(bb=backbone):
                prompt, losses = torch.nn.Parameter(init.clone()), []
                for batch in batches:
                    loss = loss_step(bb, prompt, batch)
                    loss.backward()
                    losses.append(float(loss.detach()))
                return losses

            seconds, losses = timed_passes(one_pass, args.passes + 1)
            sides[compiled] = (seconds, losses[0])
            graphs[compiled] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            print(f"training {dtype} {attention} compiled={compiled}: passes {[round(s, 1) for s in seconds]} s", flush=True)
        out["settings"][f"{dtype} {attention}"] = summary(sides, tokens, len(batches), "tokens_per_s") | {"graphs_compiled": graphs[True]}
    return out


def bench_scoring(fp32: Backbone, args) -> dict:
    task = get_task("cb")
    items = [encode(fp32.tokenizer, e, 1024) for e in load_examples(task, "val", args.data_dir)]
    prompt = from_embedded_text(embed_text(fp32.model, fp32.tokenizer, task.init_text), args.num_tokens)
    sides = {}
    for compiled in (False, True):
        backbone = copy_on(fp32, "float32", "sdpa", compiled)
        try:
            seconds, scores = timed_passes(lambda bb=backbone: score(bb, prompt, items, 32).logprobs, args.passes + 1)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:  # measured: scoring meets more shapes than the limit allows
            print(f"scoring float32 sdpa compiled: failed ({type(e).__name__})", flush=True)
            return {"examples": len(items), "settings": {"float32 sdpa": {"compiled_failed": f"{type(e).__name__}: more than "
                                                                          f"{torch._dynamo.config.recompile_limit} recompiles"}}}
        sides[compiled] = (seconds, scores[0].flatten()[torch.isfinite(scores[0].flatten())].tolist())
        print(f"scoring float32 sdpa compiled={compiled}: passes {[round(s, 1) for s in seconds]} s", flush=True)
    return {"examples": len(items), "settings": {"float32 sdpa": summary(sides, len(items), 1, "examples_per_s")}}


def summary(sides: dict[bool, tuple[list[float], list[float]]], units: int, steps: int, rate: str) -> dict:
    """Eager against compiled: steady rates (the first pass left out on both sides), overhead and break-even."""
    (plain, plain_values), (fused, fused_values) = sides[False], sides[True]
    plain_s, fused_s = statistics.median(plain[1:]), statistics.median(fused[1:])
    overhead = fused[0] - fused_s
    saving_per_step = (plain_s - fused_s) / steps
    return {
        f"{rate}_median": units / plain_s, f"compiled_{rate}_median": units / fused_s, "speedup": plain_s / fused_s,
        "seconds_per_pass": plain, "compiled_seconds_per_pass": fused, "compile_overhead_s": overhead,
        "steps_to_repay": overhead / saving_per_step if saving_per_step > 0 else None,
        "largest_difference": max(abs(a - b) for a, b in zip(plain_values, fused_values)),
    }


def main() -> None:
    parser = common_arguments(__doc__, "bench/compile.json")
    parser.add_argument("--passes", type=int, default=3, help="steady passes after the first (which compiles)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # every batch shape may recompile; past the limit dynamo would fall back to eager silently and time nothing compiled
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    fp32 = load_backbone(args.model, "cpu", "float32", "sdpa")
    result = {"cpu": cpu_hardware().to_json(), "threads": args.threads, "torch": torch.__version__, "model": args.model,
              "date": time.strftime("%Y-%m-%d"), "training": bench_training(fp32, args), "scoring": bench_scoring(fp32, args)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for part in ("training", "scoring"):
        for name, s in result[part]["settings"].items():
            if "compiled_failed" in s:
                print(f"{part} {name}: compiled side failed: {s['compiled_failed']}")
                continue
            print(f"{part} {name}: speedup {s['speedup']:.2f}x, compile overhead {s['compile_overhead_s']:.0f} s, "
                  f"repaid after {s['steps_to_repay'] and round(s['steps_to_repay'])} steps, largest difference {s['largest_difference']:.3g}")


if __name__ == "__main__":
    main()
