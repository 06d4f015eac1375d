"""Learning-rate / init / prompt-length search on the packaged model; one run folder per setting.

    python studies/search.py --task cb --lr 0.01 0.03 0.1 --init text --num-tokens 20 \
        --max-train-examples 128 --epochs 3 --out runs/search

Prints one line per run (val accuracy against the task's no-prompt and majority-class rates); the
run.json files under --out hold the full record.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import is_done, read_run
from softprompt.tasks.registry import get_task, load_examples, majority_rate
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train

# Zero-shot (no prompt) val accuracy of SmolLM2-135M-Instruct with the built-in task files (README).
ZERO_SHOT = {"cb": 26.8, "rte": 55.6, "copa": 62.0, "wsc": 63.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", required=True)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.03])
    parser.add_argument("--init", nargs="+", default=["text"])
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[20])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizer", nargs="+", default=["adamw"], help="adamw and/or adafactor (Lester: adafactor, lr 0.3)")
    parser.add_argument("--max-train-examples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/search"))
    args = parser.parse_args()
    backbone = load_backbone()
    for task, lr, init, n, seed, opt in itertools.product(args.task, args.lr, args.init, args.num_tokens, args.seed, args.optimizer):
        name = f"{task}-{init}-p{n}-lr{lr:g}-n{args.max_train_examples}-e{args.epochs}-s{seed}"
        run_dir = args.out / (name if opt == "adamw" else f"{name}-{opt}")  # adamw keeps the earlier runs' names
        if not is_done(run_dir):
            config = TrainConfig(
                task=task, lr=lr, init=init, num_tokens=n, seed=seed, epochs=args.epochs,
                max_train_examples=args.max_train_examples, batch_size=args.batch_size, optimizer=opt,
            )
            train(config, run_dir, backbone=backbone, data_dir=args.data_dir, progress=False)
        record = read_run(run_dir)
        val, dev = record["val"], record["dev"]
        majority = majority_rate([e.label for e in load_examples(get_task(task), "val", args.data_dir)])
        beats = val["accuracy"] > max(ZERO_SHOT[task], majority)
        print(
            f"{run_dir.name:<45} dev {dev['accuracy']:5.1f}  val acc {val['accuracy']:5.1f}  EM {val['exact_match']:5.1f}  "
            f"F1 {val['macro_f1']:5.1f}  best epoch {record['best_epoch']}  {record['wall_s']:.0f}s  "
            f"{'beats' if beats else 'does not beat'} max(zero-shot {ZERO_SHOT[task]}, majority {majority:.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
