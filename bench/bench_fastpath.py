"""The fast path, measured: dtype x attention for softprompt, and PEFT in both dtypes, on one CPU, interleaved.

    python bench/bench_fastpath.py --out bench/fastpath.json        (or: make bench)

Training: softprompt's `loss_step` + backward + AdamW on its length-bucketed batches of a seeded sample
of CB train (prompt 20 rows, batch 8), for each (dtype, attention); PEFT's standard step
(`get_peft_model(PromptTuningConfig)`, labels -100 on context and padding) in fp32 and bf16 with its
default attention and with eager. Every side runs the same batches; passes rotate the order; the
median of the passes' tokens/s is reported. First-step losses of each side are recorded beside fp32's.
Scoring: `eval.scoring.score` of CB val under the text prompt for each (dtype, attention), and bf16
judged in fp32 (bf16 scores everything, fp32 re-scores the examples whose bf16 top-two margin is within
`--judge-margin`: the alternative `--dtype auto` was measured against, and lost to, plain fp32 scoring): examples/s and
whether the predictions equal fp32's. The JSON names the CPU (model and flags) and the thread count.
These numbers back `fastpath.MEASURED_ATTENTION` and the README's speed table.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from softprompt.backbones.fastpath import cpu_hardware
from softprompt.backbones.loading import DEFAULT_MODEL, Backbone, load_backbone, on_fast_path
from softprompt.core.prompt import embed_text, from_embedded_text
from softprompt.data.batch import bucketed_batches, encode, train_batch
from softprompt.eval.scoring import score
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.loop import loss_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"
JUDGE_MARGIN = 0.5  # nats: about twice the largest bf16 margin move on CB/RTE val (bench/parity.json)
VARIANTS = [("float32", "sdpa"), ("float32", "eager"), ("bfloat16", "sdpa"), ("bfloat16", "eager")]


def variant(fp32: Backbone, dtype: str, attention: str) -> Backbone:
    """A copy of the fp32 backbone in `dtype` with `attention` (each side its own weights, scoring in them)."""
    backbone = replace(fp32, model=copy.deepcopy(fp32.model), reference=None)
    return on_fast_path(backbone, getattr(torch, dtype), attention, score_in_float32=False)


def judged(bf16: Backbone, fp32: Backbone, prompt: torch.Tensor, items: list, margin: float):
    """bf16 to find, fp32 to judge: bf16 scores, then fp32 re-scores the examples within `margin` of a tie."""
    scores = score(bf16, prompt, items, 32)
    top = scores.logprobs[0].topk(2, dim=-1).values  # [E, 2]
    near = ((top[:, 0] - top[:, 1]) <= margin).nonzero().flatten().tolist()
    if near:
        again = score(fp32, prompt, [items[i] for i in near], 32)
        with torch.inference_mode():  # `score` returns inference tensors: updated in place only in that mode
            scores.logprobs[:, near, : again.logprobs.shape[-1]] = again.logprobs
    return scores


def peft_side(backbone: Backbone, num_tokens: int, init: torch.Tensor):
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens))
    prompt = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        prompt.copy_(init)

    def step(batch):
        labels = torch.full_like(batch.input_ids, -100)
        labels[batch.rows, batch.positions + 1] = batch.targets  # HF shifts labels inside the loss
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss

    return prompt, step


def training_batches(fp32: Backbone, data_dir: Path, num_tokens: int, train_examples: int) -> tuple[list, torch.Tensor, list, int]:
    """A seeded sample of CB train, its length-bucketed batches of 8, the text-init prompt and the tokens a pass costs."""
    tokenizer = fp32.tokenizer
    examples = load_examples(get_task("cb"), "train", data_dir)
    items = [encode(tokenizer, e, 256) for e in random.Random(0).sample(examples, train_examples)]
    init = from_embedded_text(embed_text(fp32.model, tokenizer, get_task("cb").init_text), num_tokens)
    order = bucketed_batches(items, 8, torch.Generator().manual_seed(0))
    batches = [train_batch([items[i] for i in idx], tokenizer.pad_token_id) for idx in order]
    return items, init, batches, sum(b.num_tokens + num_tokens * b.input_ids.shape[0] for b in batches)


def bench_training(fp32: Backbone, args) -> dict:
    p = args.num_tokens
    items, init, batches, tokens = training_batches(fp32, args.data_dir, p, args.train_examples)
    sides = {}
    for dtype, attention in VARIANTS:
        backbone = variant(fp32, dtype, attention)
        prompt = torch.nn.Parameter(init.clone())
        sides[f"softprompt {dtype} {attention}"] = (prompt, lambda b, bb=backbone, pr=prompt: loss_step(bb, pr, b))
    for dtype in ("float32", "bfloat16"):
        for attention in ("sdpa", "eager"):
            backbone = variant(fp32, dtype, attention)
            sides[f"peft {dtype} {attention}"] = peft_side(backbone, p, init)
    rates = {name: [] for name in sides}
    first_batch_loss = {}
    names = list(sides)
    for rep in range(args.passes):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            prompt, step = sides[name]
            optimizer = torch.optim.AdamW([prompt], lr=0.0)  # lr 0: every pass sees the same prompt
            start = time.perf_counter()
            for batch in batches:
                loss = step(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                first_batch_loss.setdefault(name, float(loss.detach()))
            rates[name].append(tokens / (time.perf_counter() - start))
            print(f"pass {rep} {name}: {rates[name][-1]:.1f} tokens/s", flush=True)
    return {"examples": len(items), "tokens_per_pass": tokens,
            "sides": {name: {"tokens_per_s_median": statistics.median(r), "tokens_per_s": r, "first_batch_loss": first_batch_loss[name]}
                      for name, r in rates.items()}}


def bench_scoring(fp32: Backbone, args) -> dict:
    task = get_task("cb")
    items = [encode(fp32.tokenizer, e, 1024) for e in load_examples(task, "val", args.data_dir)]
    prompt = from_embedded_text(embed_text(fp32.model, fp32.tokenizer, task.init_text), args.num_tokens)
    backbones = {f"{dtype} {attention}": variant(fp32, dtype, attention) for dtype, attention in VARIANTS}
    sides = {name: (lambda b=backbone: score(b, prompt, items, 32)) for name, backbone in backbones.items()}
    pair = backbones["bfloat16 eager"], backbones["float32 sdpa"]
    sides[f"bfloat16 eager, judged in float32 within {args.judge_margin}"] = lambda: judged(*pair, prompt, items, args.judge_margin)
    want = sides["float32 sdpa"]().predictions()
    rates, same = {name: [] for name in sides}, {}
    for rep in range(args.passes):
        for name, run in sides.items():
            start = time.perf_counter()
            got = run()
            rates[name].append(len(items) / (time.perf_counter() - start))
            same[name] = bool(torch.equal(got.predictions(), want))
            print(f"pass {rep} {name}: {rates[name][-1]:.2f} examples/s, same predictions as fp32: {same[name]}", flush=True)
    return {"examples": len(items), "sides": {name: {"examples_per_s_median": statistics.median(r), "examples_per_s": r,
                                                     "predictions_equal_fp32": same[name]} for name, r in rates.items()}}


def common_arguments(description: str, out: str) -> argparse.ArgumentParser:
    """The flags every fast-path bench takes: model, data, prompt length, training sample, threads, output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--num-tokens", type=int, default=20)
    parser.add_argument("--train-examples", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def main() -> None:
    parser = common_arguments(__doc__, "bench/fastpath.json")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--judge-margin", type=float, default=JUDGE_MARGIN, help="nats: about twice the largest bf16 margin move on CB/RTE val")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "scoring"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = load_backbone(args.model, "cpu", "float32", "sdpa")
    result = {"cpu": cpu_hardware().to_json(), "threads": args.threads, "torch": torch.__version__, "model": args.model,
              "date": time.strftime("%Y-%m-%d")}
    if "scoring" not in args.skip:
        result["scoring"] = bench_scoring(fp32, args)
    if "training" not in args.skip:
        result["training"] = bench_training(fp32, args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("cpu", "threads")}))


if __name__ == "__main__":
    main()
