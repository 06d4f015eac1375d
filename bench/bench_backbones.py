"""Training tokens/s of two backbones in one process, steps interleaved (default: SmolLM2 vs Gemma 3 270M).

    python bench/bench_backbones.py --steps 4 --out bench/backbones.json

Each model trains its own prompt (the task's text init, P tokens) with softprompt's `loss_step` and
AdamW on the same examples in the same batches (a seeded sample of CB train, encoded by each
model's own tokenizer, so token counts differ). Steps alternate between the models, so a busy
machine slows both alike; the first step of each is a warm-up and not timed. tokens/s counts real
tokens: non-padding input tokens plus P per row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from softprompt.backbones.loading import load_backbone
from softprompt.core.prompt import embed_text, from_embedded_text
from softprompt.data.batch import encode, train_batch
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.loop import loss_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--task", default="cb")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per model (after one warm-up step).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-tokens", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice).")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SOFTPROMPT_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    examples = random.Random(0).sample(load_examples(task, "train", args.data_dir), args.batch_size * (args.steps + 1))
    sides = {}
    for name in args.models:
        start = time.perf_counter()
        backbone = load_backbone(name, "cpu", "float32")
        load_s = time.perf_counter() - start
        items = [encode(backbone.tokenizer, e, args.max_length) for e in examples]
        prompt = torch.nn.Parameter(from_embedded_text(embed_text(backbone.model, backbone.tokenizer, task.init_text), args.num_tokens))
        sides[name] = {"backbone": backbone, "items": items, "prompt": prompt, "optimizer": torch.optim.AdamW([prompt], lr=0.03),
                       "load_s": load_s, "seconds": 0.0, "tokens": 0}
    for step in range(args.steps + 1):
        for name, side in sides.items():
            batch = train_batch(side["items"][step * args.batch_size : (step + 1) * args.batch_size], side["backbone"].tokenizer.pad_token_id)
            start = time.perf_counter()
            loss = loss_step(side["backbone"], side["prompt"], batch)
            loss.backward()
            side["optimizer"].step()
            side["optimizer"].zero_grad(set_to_none=True)
            loss.item()
            if step > 0:  # step 0 warms up
                side["seconds"] += time.perf_counter() - start
                side["tokens"] += batch.num_tokens + args.num_tokens * batch.input_ids.shape[0]
    result = {"command": "python bench/bench_backbones.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in {"out", "data_dir"}),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "models": {}}
    base = None
    for name, side in sides.items():
        rate = side["tokens"] / side["seconds"]
        base = base or rate
        result["models"][name] = {"load_s": side["load_s"], "tokens": side["tokens"], "seconds": side["seconds"], "tokens_per_s": rate}
        print(f"{name:<24} load {side['load_s']:6.1f} s  {side['tokens']:6d} tokens  {side['seconds']:7.1f} s  "
              f"{rate:7.1f} tokens/s  ({rate / base:.2f}x the first)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
