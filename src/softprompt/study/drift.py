"""The drift stage: how far each run's prompt moved from its init tokens, from the snapshots it saved (`snapshot_every`)."""

from __future__ import annotations

from pathlib import Path

from softprompt.analysis.drift import Snapshot, drift
from softprompt.analysis.interpret import run_init_ids
from softprompt.backbones.loading import Backbone
from softprompt.io.runs import SNAPSHOT_DIR, load_prompt, read_run


def drifts(backbone: Backbone, run_dirs: dict[str, Path]) -> dict:
    """`analysis.drift.drift` for every run that saved snapshots (`snapshot_every`), by run name."""
    out = {}
    for name, run_dir in run_dirs.items():
        files = sorted((run_dir / SNAPSHOT_DIR).glob("epoch-*.safetensors"))
        if not files:
            continue
        snapshots = []
        for path in files:
            prompt, meta = load_prompt(path, hidden_size=backbone.hidden_size)
            snapshots.append(Snapshot(int(meta["epoch"]), int(meta["step"]), prompt))
        record = read_run(run_dir)
        init_ids = run_init_ids(record, backbone.tokenizer, snapshots[0].prompt.shape[0])
        out[name] = {"task": record["task"], "seed": record["config"]["seed"], **drift(backbone.model, backbone.tokenizer, snapshots, init_ids)}
    return out
