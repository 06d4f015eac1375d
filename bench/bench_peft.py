"""softprompt vs PEFT prompt tuning, and vs naive rank-classification scoring, in one process.

    python bench/bench_peft.py --out bench/results.json        (or: make bench)

Training: the same examples (a seeded sample of CB and RTE train), prompt length, batch size,
optimizer (AdamW, same lr) and initial prompt (the task's text init). Four sides run interleaved,
step by step, rotating which goes first:
  peft             PEFT's `get_peft_model(PromptTuningConfig)`, the standard step
                   `model(input_ids, attention_mask, labels)` (labels -100 on context and padding;
                   full-sequence logits), batches in shuffled order (a DataLoader with shuffle=True);
  peft-grouped     the same PEFT step on length-grouped batches, as HF Trainer's `group_by_length`
                   gives (transformers' `get_length_grouped_indices`; `length_grouped_batches`);
  softprompt-same  softprompt's `train.loss_step` on exactly PEFT's batches;
  softprompt       softprompt's `train.loss_step` on its own length-bucketed batches
                   (`batch.bucketed_batches`) of the same examples: every side covers the same
                   example set per epoch, only the grouping into batches differs.
tokens/s counts real tokens: non-padding input tokens plus the P prompt tokens of every row, the
same count for every side per epoch. The first step's loss (same batch, same prompt) must agree
within 1e-4.

Scoring: rank classification of COPA and CB val under the task's text prompt: softprompt's
`evaluate.score` vs the naive way (lm-evaluation-harness style: one row per (example, choice),
`[prompt; context + choice]`, full-sequence logits, log_softmax over the vocabulary, rows sorted
by length). Predictions must be identical.

Hardware bound: fp32 matmul FLOP/s measured here, against model FLOPs of a training step (the
formula is in `train_step_flops`); and, from torch.profiler on one step of each side, the share
of the step spent in matmuls (and in matmuls plus the attention kernels), so the tokens/s a side
would reach if everything else took no time (against PEFT's measured tokens/s: the most that
faster code around those kernels could give).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from softprompt.backbones.loading import DEFAULT_MODEL, Backbone, load_backbone
from softprompt.data.batch import Batch, Encoded, bucketed_batches, encode, pad, train_batch
from softprompt.eval.scoring import score
from softprompt.core.prompt import embed_text, from_embedded_text
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.loop import loss_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"


# ---------------------------------------------------------------- memory: peak RSS growth during a call
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn) -> int:
    """Peak resident memory above the starting level while `fn()` runs (freed heap trimmed first)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back so RSS tracks live memory
    except OSError:
        pass
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_bytes()) - base


# ---------------------------------------------------------------- FLOPs
def matmul_flops_per_s(size: int = 1024, repeats: int = 10) -> float:
    """Best-of-`repeats` fp32 `[size, size] @ [size, size]` FLOP/s (2 size^3 per product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
# The attention kernels' own work (scores, softmax, weighted sum; forward and backward): the
# attention FLOPs, which the matmul ops above do not include.
ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
    "aten::_softmax",
    "aten::_softmax_backward_data",
}


def matmul_share(fn) -> dict[str, float]:
    """The fraction of `fn()`'s wall time spent in matrix multiplications, and in those plus the
    attention kernels (torch.profiler, self time).

    What a step would gain if everything else were free: at most 1 / share.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS) / 1e6
    return {"matmuls": matmuls / wall, "matmuls_and_attention": (matmuls + attention) / wall}


def model_dims(backbone: Backbone) -> dict[str, int]:
    model = backbone.model
    embedding = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.base_model.parameters() if p.dim() == 2 and p is not embedding)
    config = model.config.get_text_config()
    return {
        "body_matmul_params": body,
        "layers": config.num_hidden_layers,
        "hidden": backbone.hidden_size,
        "vocab": embedding.shape[0],
    }


def train_step_flops(dims: dict[str, int], lengths: list[int], num_prompt: int, scored: int) -> float:
    """Model FLOPs of one training step of `[prompt; input]` rows with frozen weights.

    forward:  2 N t (matmuls, N = body matmul params, t = real tokens incl. prompt)
              + 2 L H sum_r S_r^2 (causal attention, QK^T and AV) + 2 V H s (LM head at s scored positions)
    backward: input gradients only (weights are frozen, no weight gradients): 1x the matmuls and
              the LM head, 2x the attention.
    So F = 4 N t + 6 L H sum_r S_r^2 + 4 V H s. Both sides get the same count for the same batch: it
    is the work the step needs, not what an implementation executes (PEFT also runs the LM head on
    every position; softprompt runs the prompt once per batch).
    """
    n, layers, hidden, vocab = dims["body_matmul_params"], dims["layers"], dims["hidden"], dims["vocab"]
    seqs = [num_prompt + t for t in lengths]
    return 4 * n * sum(seqs) + 6 * layers * hidden * sum(s * s for s in seqs) + 4 * vocab * hidden * scored


# ---------------------------------------------------------------- training sides
def peft_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The standard causal-LM step's inputs: labels are the ids, -100 on context and padding."""
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.rows, batch.positions + 1] = batch.targets  # HF shifts labels by one inside the loss
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}


class Side:
    """One contender: its prompt, optimizer, batches and the clock."""

    def __init__(self, name: str, prompt: torch.nn.Parameter, lr: float, batches: list[list[int]], step_fn):
        self.name, self.prompt, self.batches, self.step_fn = name, prompt, batches, step_fn
        self.optimizer = torch.optim.AdamW([prompt], lr=lr)
        self.seconds, self.tokens, self.steps, self.flops = 0.0, 0, 0, 0.0
        self.step_tokens_per_s: list[float] = []

    def step(self, batch: Batch) -> float:
        loss = self.step_fn(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def length_grouped_batches(items: list[Encoded], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """What HF Trainer's `group_by_length=True` feeds PEFT: transformers' own `get_length_grouped_indices`, cut into batches.

    Its default megabatch is `min(n // (4 * batch_size), 50)` batches, 1 (no grouping at all) at 40
    examples of batch 8; 8 batches is softprompt's own bucketing window, so both group alike.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [len(item.context) + len(item.choices[item.label]) for item in items]
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=8, generator=generator)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def real_tokens(batch: Batch, num_prompt: int) -> int:
    return batch.num_tokens + num_prompt * batch.input_ids.shape[0]


def bench_training(backbone: Backbone, args, dims: dict) -> dict:
    tokenizer, pad_id, p = backbone.tokenizer, backbone.tokenizer.pad_token_id, args.num_tokens
    peft_model = get_peft_model(backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p))
    peft_prompt = peft_model.prompt_encoder["default"].embedding.weight  # [P, H], the PEFT-trained parameter
    # a second PEFT model on the same frozen base (prompt tuning adds no layers to it), with a prompt of its own
    grouped_model = get_peft_model(backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p))
    grouped_prompt = grouped_model.prompt_encoder["default"].embedding.weight
    results: dict = {"tasks": {}, "loss_check": {}}
    totals: dict[str, dict] = {}
    for task_name in args.train_tasks:
        task = get_task(task_name)
        examples = load_examples(task, "train", args.data_dir)
        examples = random.Random(args.seed).sample(examples, min(args.train_examples, len(examples)))
        items = [encode(tokenizer, e, args.max_length) for e in examples]
        init = from_embedded_text(embed_text(backbone.model, tokenizer, task.init_text), p)
        generator = torch.Generator().manual_seed(args.seed)
        shuffled = torch.randperm(len(items), generator=generator).tolist()
        peft_batches = [shuffled[i : i + args.batch_size] for i in range(0, len(shuffled), args.batch_size)]
        own_batches = bucketed_batches(items, args.batch_size, generator)
        grouped_batches = length_grouped_batches(items, args.batch_size, generator)

        with torch.no_grad():
            peft_prompt.copy_(init)
            grouped_prompt.copy_(init)
        peft_optimizer_prompt = peft_prompt

        def peft_step(batch: Batch) -> torch.Tensor:
            return peft_model(**peft_inputs(batch)).loss

        def grouped_step(batch: Batch) -> torch.Tensor:
            return grouped_model(**peft_inputs(batch)).loss

        sides = [
            Side("peft", peft_optimizer_prompt, args.lr, peft_batches, peft_step),
            Side("peft-grouped", grouped_prompt, args.lr, grouped_batches, grouped_step),
            Side("softprompt-same", torch.nn.Parameter(init.clone()), args.lr, peft_batches, None),
            Side("softprompt", torch.nn.Parameter(init.clone()), args.lr, own_batches, None),
        ]
        for side in sides[2:]:
            side.step_fn = (lambda prompt: lambda batch: loss_step(backbone, prompt, batch))(side.prompt)

        # First step: the same batch and prompt on every side; the losses must agree (also the warm-up).
        first = train_batch([items[i] for i in peft_batches[0]], pad_id)
        losses = {side.name: side.step(first) for side in sides}
        gap = max(abs(losses["peft"] - losses[name]) for name in losses)
        results["loss_check"][task.name] = {**losses, "max_abs_diff": gap}
        print(f"{task.name}: first-step loss " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()) + f" (max diff {gap:.1e})")
        assert gap < 1e-4, f"first-step losses differ by {gap}: the sides do not do the same work"

        order = list(range(len(sides)))
        for step in range(len(peft_batches)):
            order = order[1:] + order[:1]  # rotate who goes first
            for s in order:
                side = sides[s]
                if step >= len(side.batches):
                    continue
                batch = train_batch([items[i] for i in side.batches[step]], pad_id)
                start = time.perf_counter()
                side.step(batch)
                seconds = time.perf_counter() - start
                tokens = real_tokens(batch, p)
                side.seconds += seconds
                side.tokens += tokens
                side.steps += 1
                side.step_tokens_per_s.append(tokens / seconds)
                lengths = batch.attention_mask.sum(1).tolist()
                side.flops += train_step_flops(dims, lengths, p, batch.rows.shape[0])
            print(f"  {task.name} step {step + 1}/{len(peft_batches)}", flush=True)

        memory, shares = {}, {}
        for side in sides:
            def one_step(side=side):
                side.step(first)
            memory[side.name] = peak_rss_growth(one_step)
            own_first = train_batch([items[i] for i in side.batches[0]], pad_id)
            shares[side.name] = matmul_share(lambda side=side, batch=own_first: side.step(batch))
        task_result = {}
        for side in sides:
            task_result[side.name] = {
                "steps": side.steps,
                "tokens": side.tokens,
                "seconds": side.seconds,
                "tokens_per_s": side.tokens / side.seconds,
                "median_step_tokens_per_s": statistics.median(side.step_tokens_per_s),
                "model_flops": side.flops,
                "peak_rss_growth_mb": memory[side.name] / 2**20,
                "time_share": shares[side.name],
            }
            total = totals.setdefault(side.name, {"tokens": 0, "seconds": 0.0, "flops": 0.0, "peak_rss_growth_mb": 0.0})
            total["tokens"] += side.tokens
            total["seconds"] += side.seconds
            total["flops"] += side.flops
            total["peak_rss_growth_mb"] = max(total["peak_rss_growth_mb"], memory[side.name] / 2**20)
            total.setdefault("time_shares", []).append(shares[side.name])
        results["tasks"][task.name] = task_result
        assert len({s.tokens for s in sides}) == 1, "every side must process the same tokens per epoch"
    for total in totals.values():
        total["tokens_per_s"] = total["tokens"] / total["seconds"]
        total["model_flops_per_s"] = total["flops"] / total["seconds"]
        shares = total.pop("time_shares")
        total["time_share"] = {k: statistics.mean(share[k] for share in shares) for k in shares[0]}
        # tokens/s if everything but these kernels took no time: an upper bound on what the code can reach
        total["tokens_per_s_if_only"] = {k: total["tokens_per_s"] / v for k, v in total["time_share"].items()}
    results["all"] = totals
    return results


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def naive_scores(backbone: Backbone, prompt: torch.Tensor, items: list[Encoded], batch_size: int) -> torch.Tensor:
    """lm-evaluation-harness style: a full forward per (example, choice), full logits: `[E, C]` log-likelihoods."""
    model, pad_id = backbone.model, backbone.tokenizer.pad_token_id
    requests = [(e, c) for e, item in enumerate(items) for c in range(len(item.choices))]
    requests.sort(key=lambda r: -(len(items[r[0]].context) + len(items[r[0]].choices[r[1]])))
    out = torch.full((len(items), max(len(i.choices) for i in items)), float("-inf"))
    p = prompt.shape[0]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        seqs = [items[e].context + items[e].choices[c] for e, c in chunk]
        ids, mask = pad(seqs, pad_id)
        embeds = torch.cat([prompt.expand(len(seqs), -1, -1), model.get_input_embeddings()(ids)], dim=1)
        mask = torch.cat([torch.ones(len(seqs), p, dtype=torch.long), mask], dim=1)
        logprobs = torch.log_softmax(model(inputs_embeds=embeds, attention_mask=mask).logits.float(), -1)  # [B, P+T, V]
        for r, (e, c) in enumerate(chunk):
            context, choice = items[e].context, items[e].choices[c]
            at = torch.arange(len(choice)) + p + len(context) - 1
            out[e, c] = logprobs[r, at, torch.tensor(choice)].sum()
    return out


def bench_scoring(backbone: Backbone, args) -> dict:
    tokenizer, results = backbone.tokenizer, {}
    for task_name in args.score_tasks:
        task = get_task(task_name)
        examples = load_examples(task, "val", args.data_dir)[: args.score_examples]  # None: the whole val split
        items = [encode(tokenizer, e, args.max_length) for e in examples]
        prompt = from_embedded_text(embed_text(backbone.model, tokenizer, task.init_text), args.num_tokens)
        times: dict[str, list[float]] = {"naive": [], "softprompt": []}
        predictions = {}
        for repeat in range(args.score_repeats):
            for name in (["naive", "softprompt"] if repeat % 2 == 0 else ["softprompt", "naive"]):
                start = time.perf_counter()
                if name == "naive":
                    logprobs = naive_scores(backbone, prompt, items, args.naive_batch_size)
                else:
                    logprobs = score(backbone, prompt, items, args.score_batch_size).logprobs[0]
                times[name].append(time.perf_counter() - start)
                predictions[name] = logprobs.argmax(-1)
        same = bool(torch.equal(predictions["naive"], predictions["softprompt"]))
        n = len(items)
        row = {name: {"median_s": statistics.median(t), "examples_per_s": n / statistics.median(t), "runs_s": t} for name, t in times.items()}
        row["examples"] = n
        row["ratio"] = row["softprompt"]["examples_per_s"] / row["naive"]["examples_per_s"]
        row["identical_predictions"] = same
        row["accuracy"] = float((predictions["softprompt"] == torch.tensor([i.label for i in items])).float().mean())
        results[task.name] = row
        print(f"{task.name}: scoring naive {row['naive']['median_s']:.1f} s, softprompt {row['softprompt']['median_s']:.1f} s, identical {same}", flush=True)
        assert same, f"{task.name}: softprompt and naive scoring disagree on predictions"
    return results


# ---------------------------------------------------------------- report
def print_table(result: dict) -> None:
    train, peak = result["training"], result["matmul_flops_per_s"]
    print(f"\nmachine: {result['machine']['cpus']} CPUs, torch threads {result['machine']['torch_threads']}, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"\n{'training':<18}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'vs peft':>9}{'GFLOP/s':>9}{'of peak':>9}{'peak RSS +MB':>14}")
    base = train["all"]["peft"]["tokens_per_s"]
    for name, t in train["all"].items():
        print(f"{name:<18}{t['tokens']:>8}{t['seconds']:>9.1f}{t['tokens_per_s']:>10.1f}{t['tokens_per_s'] / base:>8.2f}x"
              f"{t['model_flops_per_s'] / 1e9:>9.1f}{t['model_flops_per_s'] / peak:>8.1%}{t['peak_rss_growth_mb']:>14.0f}")
    for task, sides in train["tasks"].items():
        line = ", ".join(f"{n} {s['tokens_per_s']:.1f}" for n, s in sides.items())
        print(f"  {task}: tokens/s {line}")
    print(f"\n{'share of a step':<18}{'matmuls':>9}{'+ attention':>13}   tokens/s if only those ran (vs peft)")
    for name, t in train["all"].items():
        share, only = t["time_share"], t["tokens_per_s_if_only"]
        print(f"{name:<18}{share['matmuls']:>9.1%}{share['matmuls_and_attention']:>13.1%}   "
              f"matmuls {only['matmuls']:.1f} ({only['matmuls'] / base:.2f}x), "
              f"+ attention {only['matmuls_and_attention']:.1f} ({only['matmuls_and_attention'] / base:.2f}x)")
    print("  (vs PEFT's measured tokens/s: the most that faster code around these kernels could reach)")
    print(f"\n{'scoring':<8}{'n':>5}{'naive ex/s':>12}{'softprompt ex/s':>17}{'ratio':>8}{'same preds':>12}")
    for task, row in result["scoring"].items():
        print(f"{task:<8}{row['examples']:>5}{row['naive']['examples_per_s']:>12.2f}{row['softprompt']['examples_per_s']:>17.2f}"
              f"{row['ratio']:>7.2f}x{str(row['identical_predictions']):>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SOFTPROMPT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--train-tasks", nargs="+", default=["cb", "rte"])
    parser.add_argument("--train-examples", type=int, default=40, help="Examples sampled per task (one epoch).")
    parser.add_argument("--num-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--score-tasks", nargs="+", default=["copa", "cb"])
    parser.add_argument("--score-examples", type=int, default=None, help="First N val examples per task (default: all).")
    parser.add_argument("--score-batch-size", type=int, default=32, help="softprompt: most examples per forward (its default).")
    parser.add_argument("--naive-batch-size", type=int, default=16, help="naive: rows per forward (its fastest here, of 16/32/64).")
    parser.add_argument("--score-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps timings on a shared machine steadier (0: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.model, "cpu")
    dims = model_dims(backbone)
    started = time.time()
    peak_before = matmul_flops_per_s()
    training = bench_training(backbone, args, dims)
    scoring = bench_scoring(backbone, args)
    peak = max(peak_before, matmul_flops_per_s())
    result = {
        "command": "python bench/bench_peft.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in {"out", "data_dir"}
        ),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "model": args.model,
        "model_dims": dims,
        "matmul_flops_per_s": peak,
        "training": training,
        "scoring": scoring,
        "wall_s": time.time() - started,
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
