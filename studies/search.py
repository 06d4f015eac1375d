"""Recipe search per task, selected on dev and never on val, within a stated compute budget.

    python studies/search.py --task cb --lr 0.01 0.03 0.1 --init text class-labels --num-tokens 20 \
        --epochs-patience 12:4 24:5 --max-train-examples 225 --budget-steps 2000 --out runs/search

Every (lr, init, prompt length, epochs:patience) candidate is costed before it runs, at its upper bound
(ceil(train examples / batch) x epochs: early stopping only makes it cheaper); candidates run in the order
given until the next one would exceed `--budget-steps` for that task, and the rest are listed as skipped.
The chosen recipe is the best dev accuracy (ties: lower dev loss, then fewer steps). Only dev-side numbers
(dev metrics, per-epoch dev curve, steps, wall time) are kept in `studies/search-results/search-<task>.json`;
the val block each finished run writes is dropped, so nothing downstream can select on it. Each run folder
under --out holds the full run.json. Earlier one-off runs are kept beside it (SUMMARY.txt, <run>.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "search-results"
DEV_KEYS = ("accuracy", "loss", "n")  # what a trial keeps of its dev metrics
CURVE_KEYS = ("epoch", "step", "dev_loss", "dev_accuracy")


def candidates(lrs: list[float], inits: list[str], num_tokens: list[int], epochs_patience: list[tuple[int, int]]) -> list[dict]:
    """Every combination, in the order given (the order the budget spends in)."""
    return [{"lr": lr, "init": init, "num_tokens": n, "epochs": e, "patience": p}
            for lr, init, n, (e, p) in itertools.product(lrs, inits, num_tokens, epochs_patience)]


def upper_bound_steps(candidate: dict, train_examples: int, batch_size: int) -> int:
    """Optimizer steps if the run never stops early: ceil(train / batch) per epoch."""
    return math.ceil(train_examples / batch_size) * candidate["epochs"]


def plan(cands: list[dict], train_examples: int, batch_size: int, budget_steps: int) -> tuple[list[dict], list[dict]]:
    """Split candidates into (run, skipped): run them in order while their upper-bound steps fit `budget_steps`.

    Raises:
        ValueError: the budget does not cover even the first candidate (the message gives its cost).
    """
    run, skipped, spent = [], [], 0
    for cand in cands:
        cost = upper_bound_steps(cand, train_examples, batch_size)
        if spent + cost <= budget_steps:
            run.append({**cand, "budget_steps": cost})
            spent += cost
        else:
            skipped.append({**cand, "budget_steps": cost})
    if not run:
        first = upper_bound_steps(cands[0], train_examples, batch_size) if cands else 0
        raise ValueError(f"--budget-steps {budget_steps} does not cover the first candidate ({first} steps); raise it")
    return run, skipped


def dev_trial(candidate: dict, record: dict) -> dict:
    """A finished run as the search keeps it: its recipe and dev-side numbers only (the val block is never copied)."""
    return {
        "recipe": {k: candidate[k] for k in ("lr", "init", "num_tokens", "epochs", "patience")},
        "dev": {k: record["dev"][k] for k in DEV_KEYS if k in record["dev"]},
        "dev_curve": [{k: h.get(k) for k in CURVE_KEYS} for h in record.get("history", [])],
        "best_epoch": record["best_epoch"],
        "steps": record["steps"],
        "wall_s": record.get("wall_s"),
    }


def select(trials: list[dict]) -> dict:
    """The trial with the best dev accuracy; ties go to the lower dev loss, then to fewer steps. Reads only `dev` and `steps`.

    Raises:
        ValueError: no trials.
    """
    if not trials:
        raise ValueError("no finished trial to select from; give a larger --budget-steps or check the runs under --out")
    return max(trials, key=lambda t: (t["dev"]["accuracy"], -t["dev"].get("loss", math.inf), -t["steps"]))


def run_task(task: str, args: argparse.Namespace, backbone: Any) -> dict:
    """Train every candidate of one task that fits the budget, select on dev, and return the search record."""
    from softprompt.io.runs import is_done, read_run
    from softprompt.study.budget import check_budgets
    from softprompt.study.config import StudyConfig
    from softprompt.train.config import TrainConfig
    from softprompt.train.loop import train

    fixed = {"max_train_examples": args.max_train_examples, "batch_size": args.batch_size, "early_stop_on": "dev",
             "min_dev_examples": args.min_dev_examples}
    study = StudyConfig.from_dict({"tasks": [task], "seeds": [args.seed], **{k: v for k, v in fixed.items() if v is not None}})
    train_examples = min(check_budgets(study, args.data_dir)[task]["train"], args.max_train_examples or math.inf)
    cands = candidates(args.lr, args.init, args.num_tokens, args.epochs_patience)
    to_run, skipped = plan(cands, int(train_examples), args.batch_size, args.budget_steps)
    trials = []
    for cand in to_run:
        recipe = {k: cand[k] for k in ("lr", "init", "num_tokens", "epochs", "patience")}
        run_dir = args.out / f"{task}-{cand['init']}-p{cand['num_tokens']}-lr{cand['lr']:g}-e{cand['epochs']}p{cand['patience']}-s{args.seed}"
        if not is_done(run_dir):
            config = TrainConfig(task=task, seed=args.seed, **recipe, **{k: v for k, v in fixed.items() if v is not None})
            train(config, run_dir, backbone=backbone, data_dir=args.data_dir, progress=False)
        trials.append(dev_trial(cand, read_run(run_dir)))
        print(f"{run_dir.name:<45} dev acc {trials[-1]['dev']['accuracy']:5.1f}  best epoch {trials[-1]['best_epoch']}", flush=True)
    chosen = select(trials)
    return {"task": task, "selected_on": "dev accuracy (ties: dev loss, then steps); val never used", "seed": args.seed,
            "budget_steps": args.budget_steps, "train_examples": int(train_examples), "batch_size": args.batch_size,
            "spent_upper_bound_steps": sum(c["budget_steps"] for c in to_run), "steps_run": sum(t["steps"] for t in trials),
            "trials": trials, "skipped_for_budget": skipped, "chosen": chosen["recipe"], "chosen_dev": chosen["dev"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", required=True)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--init", nargs="+", default=["text"])
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[20])
    parser.add_argument("--epochs-patience", nargs="+", default=["12:4"], type=lambda s: tuple(int(x) for x in s.split(":")),
                        help="EPOCHS:PATIENCE pairs, e.g. 12:4 50:5")
    parser.add_argument("--budget-steps", type=int, required=True, help="Optimizer steps per task, all candidates together (upper bounds).")
    parser.add_argument("--max-train-examples", type=int, default=None, help="Default: all of train after the dev slice.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-dev-examples", type=int, default=32, help="Smallest dev slice (held out of train; selection reads it).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/search"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from softprompt.backbones.loading import load_backbone

    args = parse_args(argv)
    backbone = load_backbone()
    for task in args.task:
        record = run_task(task, args, backbone)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"search-{task}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{task}: chosen {record['chosen']} (dev {record['chosen_dev']['accuracy']:.1f})", flush=True)


if __name__ == "__main__":
    main()
