"""The report's first section, "Does it learn?": baselines against the trained prompts, paired tests, learning curves, budgets.

Reads results.json only (as every report module): the intervals and paired tests of `study.results`, each
run's summary (its history, data sizes, dtype, wall time) and the stage times. Figures are returned as
matplotlib figures; `report.html` turns them into PNGs.
"""

from __future__ import annotations

import html

import matplotlib.pyplot as plt
import numpy as np

from softprompt.report.tables import Table, fmt

BARS = (("no prompt", "no_prompt", "C7"), ("text prompt", "text_prompt", "C1"), ("trained (mean of seeds)", "mean", "C0"))


def _tasks_with_intervals(results: dict) -> list[str]:
    return [t for t in results["tasks"] if (results["evaluation"][t].get("intervals") or {}).get("mean")]


def learn_figure(results: dict) -> plt.Figure | None:
    """Per task: no prompt, text prompt and the seeds' mean as bars with 95% error bars; the majority class as a line; seeds as dots."""
    tasks = _tasks_with_intervals(results)
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, 1.9 * len(tasks)), 4.2), constrained_layout=True)
    width = 0.26
    for j, (label, key, color) in enumerate(BARS):
        ivs = [results["evaluation"][t]["intervals"][key] for t in tasks]
        x = np.arange(len(tasks)) + (j - 1) * width
        est = np.array([i["estimate"] for i in ivs])
        # [2, T]; a percentile interval need not contain its estimate, and matplotlib refuses negative lengths
        err = np.clip([[i["estimate"] - i["low"] for i in ivs], [i["high"] - i["estimate"] for i in ivs]], 0, None)
        ax.bar(x, est, width, yerr=err, capsize=3, color=color, label=label)
    for i, task in enumerate(tasks):
        ev = results["evaluation"][task]
        ax.hlines(ev["majority_class"], i - 1.5 * width, i + 1.5 * width, color="black", ls=":", lw=1.5,
                  label="majority class" if i == 0 else None)
        seeds = [s["estimate"] for s in ev["intervals"]["seeds"].values()]
        ax.scatter([i + width] * len(seeds), seeds, color="black", s=12, zorder=3, label="each seed" if i == 0 else None)
    ax.set_xticks(range(len(tasks)), [t.upper() for t in tasks])
    ax.set_ylabel("val accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="upper left")
    return fig


def curves_figure(results: dict) -> plt.Figure | None:
    """Dev loss (top) and dev accuracy (bottom) per epoch, one line per seed, one column per task."""
    by_task = {t: [(r["seed"], r["history"]) for r in results["runs"].values() if r.get("task") == t and r.get("history")]
               for t in results["tasks"]}
    tasks = [t for t, runs in by_task.items() if runs]
    if not tasks:
        return None
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks), 5.6), constrained_layout=True, squeeze=False)
    for col, task in enumerate(tasks):
        for i, (seed, history) in enumerate(by_task[task]):
            epochs = [h["epoch"] for h in history]
            for row, key in enumerate(("dev_loss", "dev_accuracy")):
                values = [np.nan if h[key] is None else h[key] for h in history]
                axes[row, col].plot(epochs, values, marker="o", ms=3, color=f"C{i}", label=f"seed {seed}")
        axes[0, col].set_title(task.upper())
        axes[1, col].axhline(results["evaluation"][task]["majority_class"], color="black", ls=":", lw=1)
        axes[1, col].set_xlabel("epoch")
    axes[0, 0].set_ylabel("dev loss")
    axes[1, 0].set_ylabel("dev accuracy (%)")
    axes[0, 0].legend(frameon=False, fontsize=8)
    return fig


def paired_table(results: dict) -> Table:
    """Each seed (and the seeds' majority vote) against no prompt on the same val examples, with the per-seed verdict."""
    rows = []
    for task in results["tasks"]:
        iv = results["evaluation"][task].get("intervals") or {}
        verdict = iv.get("verdict", {}).get("seeds", {})
        for name, p in (iv.get("paired") or {}).items():
            label = "majority vote of the seeds" if name == "ensemble" else name
            passed = "" if name not in verdict else ("yes" if verdict[name] else "NO")
            rows.append([task, label, p["n"], p["difference"], p["low"], p["high"], p["prompt_only"], p["baseline_only"],
                         p["mcnemar_p"], iv.get("baseline"), passed])
    columns = ["task", "prompt", "n", "accuracy - no prompt (points)", "95% low", "95% high", "only prompt right",
               "only no prompt right", "McNemar exact p", "baseline max(no prompt, majority)", "interval above baseline"]
    note = ("Paired: the prompt and no prompt are scored on the very same val examples. McNemar's exact test is two-sided, "
            "a binomial test on the examples exactly one of the two gets right; the interval is a seeded paired bootstrap of "
            "the accuracy difference. The last column is the per-seed verdict: the seed's whole 95% interval above "
            "max(no prompt, majority class); NO is a failure, reported as plainly as a pass.")
    return Table("paired_tests", "Trained prompt vs no prompt on the same examples", columns, rows, note)


def budget_table(results: dict) -> Table:
    """What each run got: examples, epochs run / allowed, best epoch, steps, dtype, wall time; reused or resumed."""
    rows = []
    for name, run in results["runs"].items():
        data = run.get("data") or {}
        resumed = ", ".join(str(s) for s in run.get("resumed_at_step") or []) or "–"
        rows.append([name, run["status"], "yes" if run.get("reused") else "no", resumed, data.get("train"), data.get("dev"),
                     data.get("val"), f"{fmt(run.get('epochs_run'))} / {fmt(run.get('max_epochs'))}", run.get("best_epoch"),
                     run.get("steps"), run.get("dtype"), run.get("wall_s")])
    columns = ["run", "status", "reused from an earlier call", "resumed at step", "train examples", "dev examples", "val examples",
               "epochs run / allowed", "best epoch", "steps", "dtype", "wall s"]
    note = ("Reused: the run was already done when this study was started (an earlier, perhaps halfway, study trained it; "
            "its wall time is from then). Resumed: it restarted from a checkpoint at that step.")
    return Table("budget", "The budget each run got", columns, rows, note)


def val_table(results: dict) -> Table:
    """Per task: the whole val split's size, the examples scored, and whether that is the split or a seeded subsample."""
    whole = results["protocol"].get("whole_splits", {})
    rows = []
    for task in results["tasks"]:
        n, size = results["evaluation"][task]["n"], whole.get(task, {}).get("val")
        used = "whole split" if size is not None and n == size else f"seeded subsample of {n}" if size is not None else "–"
        rows.append([task, size, n, used, whole.get(task, {}).get("train")])
    columns = ["task", "val split", "scored", "which examples", "train split after the dev slice"]
    return Table("val_examples", "Which val examples every number is on", columns, rows)


def machine_html(results: dict) -> str:
    """The machine and each stage's time, from results.json (a run's `hardware` block when the runs record one)."""
    prov = results.get("provenance", {})
    dtypes = sorted({r["dtype"] for r in results["runs"].values() if r.get("dtype")})
    hardware = next((r["hardware"] for r in results["runs"].values() if r.get("hardware")), None)
    machine = (", ".join(f"{k}: {v}" for k, v in hardware.items()) if isinstance(hardware, dict) else
               f"{prov.get('platform', '–')} (CPU model not recorded by these runs)")
    items = [f"Machine: {machine}; torch threads {prov.get('torch_threads', '–')}; torch {prov.get('torch', '–')}.",
             f"Weights dtype: {', '.join(dtypes) or '–'} (the prompt is always float32)."]
    stages = results.get("stage_wall_s") or {}
    if stages:
        items.append("Time per stage (this call): " + "; ".join(f"{k} {fmt(float(v))} s" for k, v in stages.items())
                     + f"; in all {fmt(float(results.get('wall_s', 0)))} s.")
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def verdict_lines(results: dict) -> list[str]:
    """Per task, which seeds pass and which fail the verdict, failures first-class."""
    lines = []
    for task in results["tasks"]:
        verdict = (results["evaluation"][task].get("intervals") or {}).get("verdict")
        if not verdict or not verdict["seeds"]:
            lines.append(f'<li class="bad">{html.escape(task.upper())}: no finished run to judge.</li>')
            continue
        passing, failing = verdict["passing"], verdict["failing"]
        text = (f"{task.upper()}: {len(passing)}/{len(verdict['seeds'])} seeds {verdict['rule']} ({fmt(verdict['baseline'])}); "
                f"pass: {', '.join(passing) or 'none'}; fail: {', '.join(failing) or 'none'}.")
        lines.append(f'<li class="{"good" if verdict["every_seed"] else "bad"}">{html.escape(text)}</li>')
    return lines
