"""The interpretation stage (study key `interpret = true`): for every finished run, which rows matter, what the
nearest-token reading keeps, and what the model says the prompt (and each snapshot) means; then the paper's
claim tested: are rows that kept their init token more important than rows that drifted, pooled over seeds and tasks.

Everything is scored on the study's eval items (each task's `max_val_examples` subsample), so the stage costs
1 + 2P prompt scorings per run for the rows, four for the reading, and greedy generation per frame and snapshot.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import Tensor

from softprompt.analysis.elicit import FRAMES, MAX_NEW_TOKENS
from softprompt.analysis.findings import elicitation_json, load_snapshots, reading_json, row_table
from softprompt.analysis.interpret import interpret_prompt, run_init_ids
from softprompt.analysis.reading import what_reading_keeps
from softprompt.analysis.rows import init_embeddings, persisted_vs_drifted, row_importance
from softprompt.backbones.loading import Backbone
from softprompt.core.prompt import InitMethod
from softprompt.data.batch import Encoded
from softprompt.tasks.registry import get_task


def run_interpretation(backbone: Backbone, run_dir: Path, record: dict, prompt: Tensor, items: list[Encoded], batch_size: int) -> dict:
    """One run's findings: `rows` (mean replacement, and init for a text init), `reading`, `elicitation`."""
    init_ids = run_init_ids(record, backbone.tokenizer, prompt.shape[0])
    text_init = record.get("config", {}).get("init", InitMethod.TEXT.value) == InitMethod.TEXT.value
    init = init_embeddings(backbone.model, init_ids) if text_init else None
    persisted = [row.persisted for row in interpret_prompt(backbone.model, backbone.tokenizer, prompt, init_ids, k=1)]
    task = get_task(record.get("config", {}).get("task") or record["task"])
    snapshots = load_snapshots(run_dir, backbone.hidden_size)
    return {
        "task": record["task"],
        "seed": record.get("config", {}).get("seed"),
        "rows": row_table(row_importance(backbone, prompt, items, init, batch_size), persisted),
        "reading": reading_json(what_reading_keeps(backbone, prompt, items, batch_size)),
        "elicitation": elicitation_json(backbone, prompt, FRAMES, MAX_NEW_TOKENS, task, items, snapshots, batch_size),
    }


def pooled_persistence(runs: dict[str, dict]) -> dict:
    """`persisted_vs_drifted` over every run's rows (mean-replacement log-likelihood drops), seeds and tasks pooled."""
    importances, persisted = [], []
    for finding in runs.values():
        rows = sorted(finding["rows"]["rows"], key=lambda r: r["position"])
        importances.append(np.array([r["mean_loglik_drop"] for r in rows]))
        persisted.append([bool(r["persisted"]) for r in rows])
    return {"importance": "mean_loglik_drop", **asdict(persisted_vs_drifted(importances, persisted))}


def interpret_runs(
    backbone: Backbone, out_dir: Path, records: dict[str, dict], prompts: dict[str, Tensor], items: dict[str, list[Encoded]], batch_size: int,
) -> dict:
    """results.json's `interpretation`: per run (by run name) its findings, and the pooled persisted-vs-drifted test.

    Args:
        records, prompts: the finished grid runs', by run name.
        items: each task's encoded eval set (the study's subsample).
    """
    runs = {
        name: run_interpretation(backbone, out_dir / "runs" / name, record, prompts[name], items[record["task"]], batch_size)
        for name, record in records.items()
        if record["task"] in items
    }
    return {"runs": runs, "persisted_vs_drifted": pooled_persistence(runs), "frames": list(FRAMES), "max_new_tokens": MAX_NEW_TOKENS}
