"""A trained prompt's findings as JSON-ready dicts and plain-text tables: which rows matter, what the
nearest-token reading keeps, what the model says the prompt means.

`softprompt interpret --rows / --project / --elicit` prints and writes them; the study's interpretation
stage (`study.interpretation`) stores the same dicts in results.json, so the report reads what the CLI prints.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from softprompt.analysis.drift import Snapshot
from softprompt.analysis.elicit import FRAMES, MAX_NEW_TOKENS, description_faithfulness, elicit, elicit_over_training, split_frame
from softprompt.analysis.reading import ReadingKept
from softprompt.analysis.rows import Replacement, RowAblation, rank_rows
from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Encoded
from softprompt.io.runs import SNAPSHOT_DIR, load_prompt
from softprompt.tasks.registry import Task


def row_table(ablation: RowAblation, persisted: list[bool] | None = None) -> dict:
    """Rows ranked by their vocabulary-mean replacement's log-likelihood drop, with the init replacement beside it.

    Args:
        ablation: `rows.row_importance`'s result.
        persisted: per position, whether the row's nearest token is still its init token (None: unknown).

    Returns:
        `accuracy` and `loglik` of the trained prompt, `rows` (most important first; `init_*` None for a random init).
    """
    init = {r.position: r for r in ablation.rows if r.replacement is Replacement.INIT}
    rows = []
    for rank, row in enumerate(rank_rows(ablation, Replacement.MEAN), start=1):
        by_init = init.get(row.position)
        rows.append({
            "rank": rank,
            "position": row.position,
            "persisted": None if persisted is None else bool(persisted[row.position]),
            "mean_accuracy_drop": row.accuracy_drop,
            "mean_loglik_drop": row.loglik_drop,
            "init_accuracy_drop": None if by_init is None else by_init.accuracy_drop,
            "init_loglik_drop": None if by_init is None else by_init.loglik_drop,
        })
    return {"accuracy": ablation.accuracy, "loglik": ablation.loglik, "ranked_by": "mean_loglik_drop", "rows": rows}


def format_row_table(table: dict) -> str:
    """One line per row, most important first: drops in accuracy points and gold log-likelihood (nats)."""
    cell = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"row importance (trained accuracy {table['accuracy']:.1f}, gold log-likelihood {table['loglik']:.4f})",
             f"{'rank':>4} {'pos':>3} {'kept':>4}  {'mean: acc':>9} {'loglik':>8}  {'init: acc':>9} {'loglik':>8}"]
    for r in table["rows"]:
        kept = "-" if r["persisted"] is None else "*" if r["persisted"] else ""
        lines.append(f"{r['rank']:>4} {r['position']:>3} {kept:>4}  {r['mean_accuracy_drop']:>9.1f} {r['mean_loglik_drop']:>8.4f}  "
                     f"{cell(r['init_accuracy_drop'], '.1f'):>9} {cell(r['init_loglik_drop'], '.4f'):>8}")
    lines.append("drops: trained minus the prompt with that row replaced (positive: the row helps); * kept its init token")
    return "\n".join(lines)


def reading_json(kept: ReadingKept) -> dict:
    return asdict(kept)


def format_reading(reading: dict) -> str:
    """Accuracy of the trained prompt, its readings and no prompt, with the shares of the gain the readings keep."""
    lines = [f"what the reading keeps: {reading['text']!r}", f"{'prompt':<10} {'accuracy':>9} {'loglik':>9} {'kept':>6}"]
    for name, kept in (("trained", None), ("projected", reading["kept_projected"]), ("hard_text", reading["kept_hard_text"]), ("none", None)):
        readout = reading[name]
        lines.append(f"{name:<10} {readout['accuracy']:>9.1f} {readout['loglik']:>9.4f} {'' if kept is None else format(kept, '.2f'):>6}")
    return "\n".join(lines)


def check_frames(frames: tuple[str, ...]) -> tuple[str, ...]:
    """The frames to elicit with (FRAMES when none are given), each checked.

    Raises:
        ValueError: a malformed frame; the message names `--frame` and says how to write one.
    """
    try:
        for frame in frames:
            split_frame(frame)
    except ValueError as e:
        raise ValueError(f"--frame: {e}") from None
    return frames or FRAMES


def load_snapshots(run_dir: Path, hidden_size: int) -> list[Snapshot]:
    """The prompts a run saved under snapshots/ (`--snapshot-every`), by step; none if it saved none."""
    snapshots = []
    for path in sorted((Path(run_dir) / SNAPSHOT_DIR).glob("epoch-*.safetensors")):
        prompt, meta = load_prompt(path, hidden_size=hidden_size)
        snapshots.append(Snapshot(int(meta["epoch"]), int(meta["step"]), prompt))
    return sorted(snapshots, key=lambda s: s.step)


def elicitation_json(
    backbone: Backbone, prompt: Tensor, frames: tuple[str, ...] = FRAMES, max_new_tokens: int = MAX_NEW_TOKENS,
    task: Task | None = None, items: list[Encoded] | None = None, snapshots: list[Snapshot] = (), batch_size: int = 16,
) -> dict:
    """Descriptions of `prompt` `[P, H]` per frame, scored for faithfulness when its task and val items are given,
    and of each snapshot (`over_training`, by step)."""
    final = []
    for e in elicit(backbone, prompt, frames, max_new_tokens):
        faithful = asdict(description_faithfulness(backbone, e.text, task, items, batch_size)) if task is not None and items else None
        final.append({"frame": e.frame, "text": e.text, "faithfulness": faithful})
    over_training = elicit_over_training(backbone, list(snapshots), frames, max_new_tokens) if snapshots else []
    return {"frames": list(frames), "max_new_tokens": max_new_tokens, "final": final, "over_training": over_training}


def format_elicitation(elicited: dict) -> str:
    """The final prompt's description per frame (with faithfulness where scored), then one line per snapshot."""
    lines = ["elicited descriptions (greedy):"]
    for d in elicited["final"]:
        f = d["faithfulness"]
        score = "" if f is None else (f"  [hard-prompt accuracy {f['hard_prompt_accuracy']:.1f}, label words "
                                      f"{f['label_word_overlap']:.2f}, init text {f['init_text_overlap']:.2f}]")
        lines.append(f"{d['frame']!r} -> {d['text']!r}{score}")
    for s in elicited["over_training"]:
        lines.append(f"epoch {s['epoch']} (step {s['step']}): " + " | ".join(repr(t) for t in s["descriptions"]))
    return "\n".join(lines)
