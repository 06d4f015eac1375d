"""fp32 twins of a study's runs: does `--dtype auto` (bf16 training on a native-bf16 CPU) change what a run learns?

    python studies/twins.py studies/quick.toml runs/quick --tasks cb copa --out runs/twins

For each (task, seed) of the study's grid on the named tasks (the config the study ran, and its folder), the same run config is trained again
with `dtype = "float32"` into OUT/<task>-s<seed>-float32 (a finished twin is reused). Then per run:
the study run's val accuracy against its fp32 twin's 95% Wilson interval, and the loss of the first
training step (the same first batch, the same initial prompt) under each dtype, against a stated
tolerance. Everything goes to OUT/twins.json; a line per run is printed. Exit status 1 when a run
falls outside its twin's interval or its first-step loss outside the tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from softprompt.analysis.statistics import wilson_interval
from softprompt.backbones.loading import Backbone, load_backbone
from softprompt.data.batch import bucketed_batches
from softprompt.io.runs import atomic_write_json, is_done, provenance, read_run
from softprompt.study.config import StudyConfig
from softprompt.study.grid import run_name
from softprompt.train.config import TrainConfig
from softprompt.train.loop import set_up, step_loss, train

# nats: bf16's rounding moves a first-batch loss of ~3.8 by ~0.02 (bench/fastpath.json: 3.774 fp32 against
# 3.755 bf16 eager); 0.05 leaves room for the batch mix of other tasks.
FIRST_STEP_TOLERANCE = 0.05


def first_step_loss(config: TrainConfig, data_dir: str | None, backbone: Backbone | None = None) -> float:
    """The loss `train` computes on its first step: the same set-up, generator and first batch, in a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        run = set_up(config, Path(scratch) / "run", backbone, data_dir, resume=False)
        first = bucketed_batches(run.train_items, config.batch_size, run.generator)[0]
        loss, _ = step_loss(run, [run.train_items[i] for i in first], run.backbone.tokenizer.pad_token_id, config.anchor_weight)
        return float(loss.detach())


def load_backbones(config: TrainConfig) -> dict[str, Backbone]:
    """The study run's backbone (its dtype) and the fp32 twin's, each loaded once for every comparison."""
    return {"auto": load_backbone(config.model, config.device, config.dtype, config.attention),
            "float32": load_backbone(config.model, config.device, "float32", config.attention)}


def compare(config: TrainConfig, study_run: Path, twin_dir: Path, data_dir: str | None, backbones: dict[str, Backbone] | None = None) -> dict:
    """One study run against its fp32 twin (trained here unless finished); `backbones` from `load_backbones` (default: loaded here)."""
    twin_config = dataclasses.replace(config, dtype="float32")
    backbones = backbones or load_backbones(config)
    if not is_done(twin_dir):
        train(twin_config, twin_dir, backbones["float32"], data_dir=data_dir, progress=False, resume=(twin_dir / "run.json").is_file())
    ours, twin = read_run(study_run), read_run(twin_dir)
    n = twin["val"]["n"]
    interval = wilson_interval(round(twin["val"]["accuracy"] * n / 100), n)
    losses = {"auto": first_step_loss(config, data_dir, backbones["auto"]), "float32": first_step_loss(twin_config, data_dir, backbones["float32"])}
    inside = interval.low <= ours["val"]["accuracy"] <= interval.high
    close = abs(losses["auto"] - losses["float32"]) <= FIRST_STEP_TOLERANCE
    return {"run": study_run.name, "dtype": ours["dtype"], "val_accuracy": ours["val"]["accuracy"], "n": n,
            "float32_val_accuracy": twin["val"]["accuracy"], "float32_interval": dataclasses.asdict(interval),
            "inside_float32_interval": inside, "first_step_loss": losses, "first_step_tolerance": FIRST_STEP_TOLERANCE,
            "first_step_within_tolerance": close, "wall_s": {"auto": ours.get("wall_s"), "float32": twin.get("wall_s")},
            "best_epoch": {"auto": ours.get("best_epoch"), "float32": twin.get("best_epoch")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the study's TOML")
    parser.add_argument("study", type=Path, help="the study's folder (its runs/)")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    config = StudyConfig.from_toml(args.config)
    backbones = load_backbones(config.train_config(args.tasks[0], config.seeds[0]))  # shared keys: one backbone per dtype for all
    rows = []
    for task in args.tasks:
        for seed in config.seeds:
            row = compare(config.train_config(task, seed), args.study / "runs" / run_name(task, seed),
                          args.out / f"{run_name(task, seed)}-float32", args.data_dir, backbones)
            rows.append(row)
            print(f"{row['run']}: {row['dtype']} val {row['val_accuracy']:.1f}, float32 twin {row['float32_val_accuracy']:.1f} "
                  f"[{row['float32_interval']['low']:.1f}, {row['float32_interval']['high']:.1f}] inside: {row['inside_float32_interval']}; "
                  f"first-step loss {row['first_step_loss']['auto']:.4f} vs {row['first_step_loss']['float32']:.4f}", flush=True)
    atomic_write_json(args.out / "twins.json", {"study": str(args.study), "runs": rows, "provenance": provenance()})
    return 0 if all(r["inside_float32_interval"] and r["first_step_within_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
