"""The study report: results.json in; CSV tables, PNG figures and one self-contained report.html out.

Everything here reads files written by `softprompt.study.pipeline`; nothing trains or scores, so
`softprompt report STUDY_DIR` rebuilds the report in seconds.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from softprompt.io.runs import atomic_write_bytes  # noqa: E402

REPORT_FILE = "report.html"
FIGURES = ("learn", "curves", "tsne", "pca", "similarity", "transfer", "spot", "ablation", "anchor")

from softprompt.report.paper import PAPER_TABLE1, PAPER_TABLE2, PAPER_TRANSFER_GAIN  # noqa: E402 - the paper's numbers, one place
from softprompt.report.tables import Table, fmt, to_csv  # noqa: E402
from softprompt.report import learning  # noqa: E402 - "Does it learn?": the report's first section
from softprompt.report import anchor  # noqa: E402 - the anchor trade-off's section


# --- tables --------------------------------------------------------------------------------------


def accuracy_table(results: dict) -> Table:
    seeds = results["study"]["seeds"]
    columns = ["task", "metric", "n", "majority class", "no prompt", "text prompt"] + [f"seed {s}" for s in seeds]
    columns += ["mean", "sd", "majority vote", "mean log-prob"]
    rows = []
    for task in results["tasks"]:
        ev = results["evaluation"][task]
        for key, label in (("accuracy", "accuracy"), ("exact_match", "exact match")):
            per_seed = [ev["seeds"].get(str(s), {}).get(key) for s in seeds]
            ens = ev.get("ensemble") or {}
            vote, mean_lp = (ens.get("majority_vote"), ens.get("mean_logprob")) if key == "accuracy" else (None, None)
            rows.append([task, label, ev["n"], ev["majority_class"], ev["no_prompt"][key], ev["text_prompt"][key], *per_seed,
                         ev.get(f"mean_{key}"), ev.get(f"sd_{key}"), vote, mean_lp])
    note = ("Accuracy: rank classification (highest summed log-likelihood). Exact match: greedy decoding reproduces "
            "the answer (the paper's metric). Ensembles are defined on choice scores, so they have no exact match.")
    return Table("accuracy", "Accuracy on val (%)", columns, rows, note)


def ensemble_table(results: dict) -> Table:
    rows = []
    for task in results["tasks"]:
        ens = results["evaluation"][task].get("ensemble")
        if ens:
            rows.append([task, ens["k"], ens["mean"], ens["sd"], ens["best"], ens["majority_vote"], ens["mean_logprob"]])
    columns = ["task", "k prompts", "single: mean", "single: sd", "single: best", "ensemble: majority vote", "ensemble: mean log-prob"]
    note = ("Lester et al. (2021) Table 3 layout. The k prompts are scored together on each batch (one forward per prompt over the same encoded batch); majority vote breaks ties by the "
            "mean log-probability; accuracy in %.")
    return Table("ensemble", "Prompt ensembling", columns, rows, note)


def table1(results: dict) -> Table:
    spread = results["stochasticity"].get("spread", {})
    rows = []
    for task in results["tasks"]:
        s = spread.get(task)
        paper = PAPER_TABLE1.get(task, (None, None))
        if s:
            rows.append([task, s["n"], s["mean_norm"], s["norm_variance"], s["centroid_msd"], s["mean_pairwise_distance"], *paper])
    columns = ["task", "prompts", "mean ||A||_F", "variance of ||A||_F (ddof=1)", "mean sq. distance to centroid",
               "mean pairwise ||A-B||_F", "paper: avg norm", "paper: variance"]
    note = ("The paper does not say which variance its Table 1 reports; we give the sample variance of the norms and the "
            "total variance around the task's mean prompt. Norms depend on the model's embedding scale (paper: "
            "bloomz-560m, hidden 1024), so compare the ordering of tasks, not the values.")
    return Table("stochasticity", "Norms and spread of the prompts per task (the paper's Table 1)", columns, rows, note)


def table2(results: dict) -> Table:
    rows = []
    for task in results["tasks"]:
        ev = results["evaluation"][task]
        seeds = [m["exact_match"] for m in ev["seeds"].values()]
        paper = PAPER_TABLE2.get(task, (None, None))
        rows.append([task, ev["no_prompt"]["exact_match"], ev["text_prompt"]["exact_match"],
                     float(np.median(seeds)) if seeds else None, max(seeds) if seeds else None, *paper, ev["majority_class"]])
    columns = ["task", "ours: no prompt", "ours: text prompt", "ours: median over seeds", "ours: max over seeds",
               "paper: median", "paper: max", "majority class"]
    note = ("Exact match, %. The paper's Table 2 is zero-shot accuracy over hand-written prompts from the BLOOMZ paper, "
            "not soft prompts; it is the paper's difficulty reference.")
    return Table("zero_shot", "Beside the paper's Table 2", columns, rows, note)


def paper_transfer_table(results: dict) -> Table:
    """Our exact-match transfer gain beside the paper's Figure 8, pair by pair (the paper's cell where its text gives one)."""
    transfer = results["transfer"]
    tasks = transfer.get("tasks", [])
    rows = [[source, target, gain, PAPER_TRANSFER_GAIN.get((source, target))]
            for source, gains in zip(tasks, transfer.get("gain_exact_match", [])) for target, gain in zip(tasks, gains)]
    note = ("Exact-match gain in points of the source task's prompt on the target task over no prompt. The paper's Figure 8 "
            "is an image; its text states one cell (CB's prompt on COPA: +0.4), the others are left blank rather than guessed.")
    return Table("transfer_beside_paper", "Transfer gain beside the paper's Figure 8", ["source prompt", "target task", "ours", "paper"], rows, note)


def matrix_table(name: str, title: str, labels: list[str], matrix: list[list[float]], note: str = "", corner: str = "") -> Table:
    return Table(name, title, [corner] + labels, [[label, *row] for label, row in zip(labels, matrix)], note)


def correlation_table(results: dict) -> Table:
    transfer = results["transfer"]
    rows = []
    for key in ("accuracy", "exact_match"):
        c = transfer.get(f"correlation_{key}")
        if c:
            rows.append([key, c["n_pairs"], c["spearman"], c["spearman_p"], c["pearson"], c["pearson_p"]])
    note = ("Between ||A-B||_F of two tasks' prompts and the gain of one task's prompt on the other task, over the "
            "off-diagonal pairs. The paper's claim (more similar prompts transfer better) predicts a negative coefficient.")
    return Table("correlation", "Does similarity predict transfer?", ["metric", "pairs", "Spearman", "p", "Pearson", "p"], rows, note)


def nearest_token_table(results: dict) -> Table:
    rows = []
    for name, reading in results["interpret"].items():
        for row in reading["rows"]:
            for rank, n in enumerate(row["neighbours"], start=1):
                rows.append([name, reading["task"], reading["seed"], row["position"], row["init_token"], row["persisted"], rank, n["token"], n["script"], n["cosine"], n["token_id"]])
    columns = ["run", "task", "seed", "position", "init token", "persisted", "rank", "token", "script", "cosine", "token id"]
    return Table("nearest_tokens", "Nearest vocabulary tokens of every prompt row", columns, rows)


def runs_table(results: dict) -> Table:
    rows = []
    for name, run in results["runs"].items():
        val = run.get("val") or {}
        dev = run.get("dev") or {}
        rows.append([name, run.get("task"), run.get("seed"), run["status"], run.get("best_epoch"), run.get("epochs_run"), run.get("steps"),
                     dev.get("loss"), dev.get("accuracy"), val.get("accuracy"), val.get("exact_match"), run.get("wall_s")])
    columns = ["run", "task", "seed", "status", "best epoch", "epochs run", "steps", "dev loss", "dev accuracy", "val accuracy", "val exact match", "wall s"]
    return Table("runs", "Training runs", columns, rows, "Val metrics here are on the full val split (from run.json).")


def interval_table(results: dict) -> Table:
    rows = []
    for task in results["tasks"]:
        ev = results["evaluation"][task]
        iv = ev.get("intervals")
        if not iv:
            continue
        entries = [("no prompt", iv["no_prompt"], None), ("text prompt", iv["text_prompt"], None)]
        entries += [(f"seed {name.rsplit('-s', 1)[1]}", s, s["beats"]) for name, s in iv["seeds"].items()]
        if "mean" in iv:
            entries.append((f"mean of {len(iv['seeds'])} seed(s)", iv["mean"], iv["beats"]))
        for label, i, verdict in entries:
            sd = ev.get("sd_accuracy") if label.startswith("mean") else None
            rows.append([task, label, i["n"], i["estimate"], i["low"], i["high"], sd, iv["baseline"], "" if verdict is None else ("yes" if verdict else "no")])
    columns = ["task", "prompt", "n", "accuracy", "95% low", "95% high", "sd over seeds", "baseline max(no prompt, majority)", "beats baseline"]
    note = ("Percentile bootstrap over val examples (2,000 resamples, seeded); for the mean of the seeds the examples are resampled "
            "jointly for every seed, so its interval is over examples, and the sd beside it is the spread over seeds. "
            "'beats baseline' means the whole interval lies above max(no prompt, majority class).")
    return Table("accuracy_intervals", "Accuracy with 95% intervals, and the verdict", columns, rows, note)


MEASURE_TITLES = {
    "frobenius": "||A-B||_F (the paper's)", "cosine": "cosine of flattened prompts",
    "average_token_cosine": "cosine of average tokens (SPoT)", "per_token_cosine": "per-token average cosine (SPoT)",
    "neuron_overlap": "ON: overlap of activated FFN neurons (Su et al.)",
}


def predictor_table(results: dict) -> Table:
    rows = [[r["transfer"], r["rank"], MEASURE_TITLES.get(r["measure"], r["measure"]), r["n_pairs"], r["spearman"], r["spearman_p"],
             r["pearson"], r["pearson_p"], r["spearman_naive_p"], f"{r['permutations']} ({'all' if r['exact'] else 'sampled'})"]
            for r in results.get("predictors", [])]
    columns = ["transfer", "rank", "measure", "pairs", "Spearman", "Mantel p", "Pearson", "Mantel p", "naive Spearman p", "relabellings"]
    note = ("Each measure is oriented so that higher = more similar (||A-B||_F is negated): a positive coefficient means more similar "
            "prompts transfer better. Mantel p: two-sided, over joint relabellings of the tasks (pairs share tasks, so the naive p-value, "
            "which treats them as independent, is too small). The smallest possible Mantel p is 1/T! for T tasks.")
    return Table("similarity_measures", "Which similarity measure predicts transfer?", columns, rows, note)


def drift_table(results: dict) -> Table:
    rows = []
    for name, d in results.get("drift", {}).items():
        for snap in d["snapshots"]:
            scripts = ", ".join(f"{k} {v}" for k, v in snap["scripts"].items())
            correct = "; ".join(f"row {p}: {tok} ({'/'.join(langs)})" for p, tok, langs in snap["correct_rows"])
            rows.append([name, d["task"], snap["epoch"], snap["step"], f"{snap['persisted']}/{d['num_rows']}",
                         f"{snap['left_script']}/{d['num_rows']}", scripts, correct, " ".join(snap["tokens"])])
    columns = ["run", "task", "epoch", "step", "rows on init token", "rows left init's script", "scripts of nearest tokens",
               "'correct'/'accurate' tokens", "nearest token per row"]
    note = ("From prompt snapshots saved every `snapshot_every` epochs (epoch 0 = the init). 'Left the script': the nearest token's Unicode "
            "script differs from the init token's (Common tokens, i.e. punctuation, digits, spaces, never count). 'Correct' tokens: a whole token "
            "equal (case-folded, stripped) to a word in the hand-written list softprompt.analysis.drift.CORRECT_WORDS; sub-word pieces and "
            "unlisted languages are missed, so an empty cell means none of those words.")
    return Table("drift", "Drift of the nearest tokens over training", columns, rows, note)


def ablation_table(results: dict) -> Table:
    ab = results.get("ablation") or {}
    rows = [[task, init, *values] for task, by_init in ab.get("accuracy", {}).items() for init, values in by_init.items()]
    return Table("ablation", "Lester's ablation: val accuracy by prompt length and init", ["task", "init", *(f"{n} tokens" for n in ab.get("lengths", []))],
                 rows, "One seed per cell; full val split (from each run's run.json).")


TRANSFER_TABLES = (  # (CSV name, results key, title)
    ("transfer_accuracy", "accuracy", "Transfer: accuracy of each task's prompt (rows) on each task (columns)"),
    ("transfer_gain_accuracy", "gain_accuracy", "Transfer gain: accuracy minus the column task's no-prompt accuracy"),
    ("transfer_exact_match", "exact_match", "Transfer: exact match"),
    ("transfer_gain_exact_match", "gain_exact_match",
     "Transfer gain: exact match minus the column task's no-prompt exact match (the paper's Figure 8)"),
)


def all_tables(results: dict) -> list[Table]:
    tables = [learning.paired_table(results), learning.budget_table(results), learning.val_table(results)]
    tables += [accuracy_table(results), ensemble_table(results), table1(results), table2(results), runs_table(results)]
    sim, transfer, stoch = results["similarity"], results["transfer"], results["stochasticity"]
    if sim.get("tasks"):
        tables += [
            matrix_table("similarity", "Similarity ||A-B||_F of the tasks' prompts (lower = more similar)", sim["tasks"], sim["frobenius"],
                         f"Prompts: {', '.join(sim['prompts'])} (one seed per task, the ones used for transfer)."),
            matrix_table("cosine", "Cosine similarity of the flattened prompts", sim["tasks"], sim["cosine"]),
            matrix_table("similarity_centroids", "||A-B||_F between the tasks' mean prompts (over seeds)", sim["tasks"], sim["centroid_frobenius"]),
        ]
    if transfer.get("tasks"):
        tables += [
            *(matrix_table(name, title, transfer["tasks"], transfer[key], corner="prompt \\ task") for name, key, title in TRANSFER_TABLES),
            correlation_table(results), paper_transfer_table(results),
        ]
    if stoch.get("group_distances"):
        g = stoch["group_distances"]
        tables.append(matrix_table("task_distances", "Mean pairwise ||A-B||_F within a task (diagonal) and between tasks", g["tasks"], g["matrix"]))
        tables.append(Table("norms", "Frobenius norm of every prompt", ["run", "task", "norm"], [[n, g_, v] for n, g_, v in zip(stoch["prompts"], stoch["groups"], stoch["norms"])]))
    if stoch.get("maps"):
        rows = [[n, g_, *t, *p] for n, g_, t, p in zip(stoch["prompts"], stoch["groups"], stoch["maps"]["tsne"], stoch["maps"]["pca"])]
        tables.append(Table("maps", "2-D maps of the prompts", ["run", "task", "tsne x", "tsne y", "pca x", "pca y"], rows))
    tables.append(nearest_token_table(results))
    tables += [interval_table(results), predictor_table(results), drift_table(results), ablation_table(results)]
    for name, matrix in sim.get("measures", {}).items():
        if name not in ("frobenius", "cosine"):
            tables.append(matrix_table(f"similarity_{name}", MEASURE_TITLES[name], sim["tasks"], matrix))
    if results.get("anchor"):
        tables.append(anchor.anchor_table(results["anchor"]))
    spot = results.get("spot")
    if spot:
        note = f"Target val accuracy after {spot['steps']} steps from the row task's prompt, minus the same budget from the target's own init."
        tables.append(matrix_table("spot_gain", "SPoT gain: source prompt (rows) -> target task (columns)", spot["tasks"], spot["gain"], note, "source \\ target"))
        tables.append(matrix_table("spot_accuracy", "SPoT: target val accuracy from each source prompt", spot["tasks"], spot["accuracy"], corner="source \\ target"))
        tables.append(Table("spot_default", "SPoT baseline: the target's own init, same budget", ["task", "val accuracy"], [[t, a] for t, a in spot["default"].items()]))
    return tables


# --- figures -------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def map_figure(stoch: dict, kind: str, title: str) -> bytes:
    points = np.array(stoch["maps"][kind])
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for i, task in enumerate(dict.fromkeys(stoch["groups"])):
        pick = np.array([g == task for g in stoch["groups"]])
        xy = points[pick]
        color = f"C{i}"
        if len(xy) > 1:  # connect a task's runs, as the paper's Figure 6
            closed = np.vstack([xy, xy[:1]]) if len(xy) > 2 else xy
            ax.plot(closed[:, 0], closed[:, 1], color=color, alpha=0.4, lw=1)
        ax.scatter(xy[:, 0], xy[:, 1], color=color, label=task, s=40, zorder=3)
    ax.set_title(title)
    ax.legend(frameon=False)
    return _png(fig)


def heatmap(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, cmap: str, ax, center_zero: bool = False, digits: int = 1) -> None:
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    kwargs = {}
    if center_zero:
        bound = max(1.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)  # points; all-zero stays readable
        kwargs = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(data, cmap=cmap, **kwargs)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=10)
    finite = data[np.isfinite(data)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            value = data[i, j]
            text = "–" if np.isnan(value) else (f"{value:+.{digits}f}" if center_zero else f"{value:.{digits}f}")
            dark = (not center_zero and value > middle) or (center_zero and abs(value) > 0.6 * kwargs["vmax"])
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def similarity_figure(sim: dict) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), constrained_layout=True)
    heatmap(sim["frobenius"], sim["tasks"], sim["tasks"], "||A-B||_F (lower = more similar)", "viridis_r", axes[0])
    heatmap(sim["cosine"], sim["tasks"], sim["tasks"], "cosine of flattened prompts", "viridis", axes[1], digits=2)
    return _png(fig)


def transfer_figure(transfer: dict) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), constrained_layout=True)
    labels = transfer["tasks"]
    heatmap(transfer["gain_accuracy"], labels, labels, "accuracy gain over no prompt (points)", "RdBu", axes[0], center_zero=True)
    heatmap(transfer["gain_exact_match"], labels, labels, "exact-match gain over no prompt (points)", "RdBu", axes[1], center_zero=True)
    for ax in axes:
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("prompt trained on")
    return _png(fig)


def spot_figure(transfer: dict, spot: dict) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6), constrained_layout=True)
    heatmap(transfer["gain_accuracy"], transfer["tasks"], transfer["tasks"], "zero-shot transfer: accuracy gain over no prompt", "RdBu", axes[0], center_zero=True)
    heatmap(spot["gain"], spot["tasks"], spot["tasks"], f"SPoT gain over own init ({spot['steps']} steps)", "RdBu", axes[1], center_zero=True)
    for ax in axes:
        ax.set_xlabel("target task")
        ax.set_ylabel("source prompt")
    return _png(fig)


def ablation_figure(ablation: dict, evaluation: dict) -> bytes:
    """Lester et al.'s Figure 3: val accuracy against prompt length (log x), one line per init, one panel per task."""
    tasks = list(ablation["accuracy"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), constrained_layout=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (init, values) in enumerate(ablation["accuracy"][task].items()):
            ys = [np.nan if v is None else v for v in values]
            ax.plot(ablation["lengths"], ys, marker="o", color=f"C{i}", label=init)
        ev = evaluation.get(task, {})
        if ev:
            ax.axhline(ev["no_prompt"]["accuracy"], color="grey", ls="--", lw=1, label="no prompt")
            ax.axhline(ev["majority_class"], color="black", ls=":", lw=1, label="majority class")
        ax.set_xscale("log")
        ax.set_xticks(ablation["lengths"], [str(n) for n in ablation["lengths"]])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the lengths trained are labelled
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title(task.upper())
        ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def figures(results: dict) -> dict[str, bytes]:
    out = {name: _png(fig) for name, fig in (("learn", learning.learn_figure(results)), ("curves", learning.curves_figure(results))) if fig}
    stoch = results["stochasticity"]
    if stoch.get("maps"):
        out["tsne"] = map_figure(stoch, "tsne", f"t-SNE of all prompts (perplexity {stoch['perplexity']:.1f})")
        out["pca"] = map_figure(stoch, "pca", "PCA of all prompts (first two components)")
    if results["similarity"].get("tasks"):
        out["similarity"] = similarity_figure(results["similarity"])
    if results["transfer"].get("tasks"):
        out["transfer"] = transfer_figure(results["transfer"])
    if results.get("spot") and results["transfer"].get("tasks"):
        out["spot"] = spot_figure(results["transfer"], results["spot"])
    if (results.get("ablation") or {}).get("accuracy"):
        out["ablation"] = ablation_figure(results["ablation"], results["evaluation"])
    if results.get("anchor"):
        out["anchor"] = _png(anchor.anchor_figure(results["anchor"]))
    return out


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.88em;max-width:60em}
.persisted{background:#ffe08a;font-weight:600}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre}td.tok,td.cell{text-align:left}
.script{color:#777;font-size:.8em;margin-left:.25em}
.bad{color:#b00020;font-weight:600}.good{color:#1b7f3b;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#555;font-size:.88em}
.tokgrid{display:flex;flex-wrap:wrap;gap:1.5em}
"""


def e(value: Any) -> str:
    return html.escape(fmt(value) if not isinstance(value, str) else value)


def v(value: Any) -> str:
    """A config value exactly as given (no rounding), escaped."""
    return html.escape(str(value))


def table_html(table: Table) -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{e(table.note)} (CSV: {e(table.name)}.csv)</p>' if table.note else f'<p class="note">CSV: {e(table.name)}.csv</p>'
    return f"<h3>{e(table.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def figure_html(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure id="fig-{name}"><img alt="{e(caption)}" src="data:image/png;base64,{data}"><figcaption>{e(caption)}</figcaption></figure>'


def tokens_html(results: dict) -> str:
    parts = ['<p class="note">Each row of a prompt and its nearest vocabulary tokens by cosine similarity, best first. '
             '<span class="persisted">Highlighted</span>: the nearest token is still the init token at that position. '
             '␣ marks a space. The script of each token is shown after it; the CSV has every seed.</p><div class="tokgrid">']
    for task in results["tasks"]:
        name = results["representative"].get(task)
        reading = results["interpret"].get(name) if name else None
        if not reading:
            continue
        rows = []
        for r in reading["rows"]:
            cells = []
            for rank, n in enumerate(r["neighbours"]):
                cells.append(f'<td class="cell{" persisted" if rank == 0 and r["persisted"] else ""}"><span class="tok">{e(n["token"])}</span><span class="script">{e(n["script"])} {n["cosine"]:.2f}</span></td>')
            rows.append(f'<tr><td>{r["position"]}</td><td class="tok">{e(r["init_token"] or "–")}</td>{"".join(cells)}</tr>')
        scripts = _script_counts(results, task)
        head = "".join(f"<th>#{i + 1}</th>" for i in range(len(reading["rows"][0]["neighbours"]))) if reading["rows"] else ""
        per_seed = ", ".join(f"seed {r['seed']}: {sum(row['persisted'] for row in r['rows'])}/{len(r['rows'])}"
                             for r in results["interpret"].values() if r["task"] == task)
        parts.append(f'<div><h3>{e(task.upper())}: run {e(name)}</h3><p class="note">Rows persisted: {e(per_seed)}. '
                     f'Scripts of the top-1 tokens over all seeds: {e(scripts)}</p>'
                     f'<table><tr><th>pos</th><th>init</th>{head}</tr>{"".join(rows)}</table></div>')
    parts.append("</div>")
    return "".join(parts)


def _script_counts(results: dict, task: str) -> str:
    counts: dict[str, int] = {}
    for reading in results["interpret"].values():
        if reading["task"] == task:
            for r in reading["rows"]:
                script = r["neighbours"][0]["script"]
                counts[script] = counts.get(script, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def verdicts(results: dict) -> list[str]:
    """One honest sentence per task: does the soft prompt beat no prompt and the majority class?

    "Beats" needs the whole 95% interval of the seeds' mean accuracy above the baseline.
    """
    lines = []
    for task in results["tasks"]:
        ev = results["evaluation"][task]
        mean = ev.get("mean_accuracy")
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            lines.append(f'<li class="bad">{e(task.upper())}: no finished run.</li>')
            continue
        zero, majority, text = ev["no_prompt"]["accuracy"], ev["majority_class"], ev["text_prompt"]["accuracy"]
        iv = (ev.get("intervals") or {}).get("mean")
        low = iv["low"] if iv else mean  # results.json from before intervals: the point estimate
        failed = [f"{name} ({fmt(value)})" for name, value in (("no prompt", zero), ("the majority class", majority)) if not low > value]
        verdict = (f"does NOT beat {' or '.join(failed)}" if failed
                   else f"beats no prompt ({fmt(zero)}) and the majority class ({fmt(majority)})")
        interval = f" [95% interval {fmt(iv['low'])}–{fmt(iv['high'])}]" if iv else ""
        seeds_beat = ev["intervals"].get("seeds", {}) if iv else {}
        per_seed = f", {sum(s['beats'] for s in seeds_beat.values())}/{len(seeds_beat)} seeds beat it on their own interval" if seeds_beat else ""
        lines.append(
            f'<li class="{"bad" if failed else "good"}">{e(task.upper())}: mean soft-prompt accuracy {fmt(mean)}{e(interval)} over '
            f'{len(ev["seeds"])} seed(s) (sd {fmt(ev.get("sd_accuracy"))}) {e(verdict)}{e(per_seed)}; text prompt {fmt(text)}, best seed {fmt(ev["ensemble"]["best"])}, '
            f'majority-vote ensemble {fmt(ev["ensemble"]["majority_vote"])}.</li>'
        )
    return lines


def protocol_html(results: dict) -> str:
    s = results["study"]
    splits = results["protocol"]["splits"]
    split_rows = "".join(
        f"<tr><td>{v(t)}</td><td>{v(d.get('train', '–'))}</td><td>{v(d.get('dev', '–'))}</td><td>{v(d.get('val', '–'))}</td><td>{v(d.get('eval', '–'))}</td></tr>"
        for t, d in splits.items()
    )
    early = {"dev": "a stratified dev slice held out of train (val stays unseen until the end)",
             "val": "the val split itself (the paper's protocol: it selects on the split it reports)"}.get(s["early_stop_on"], s["early_stop_on"])
    failed = [n for n, r in results["runs"].items() if r["status"] != "done"]
    items = [
        f"Model: <b>{v(results['model'])}</b> (frozen); prompt length {v(s['num_tokens'])}; init: {v(s['init'])}"
        + (f" ({v(s['init_text'])})" if s.get("init_text") else " (each task's hand-written good prompt, repeated or truncated)" if s["init"] == "text" else ""),
        f"Optimiser: AdamW, lr {v(s['lr'])}, weight decay {v(s['weight_decay'])}, batch {v(s['batch_size'])} x {v(s['grad_accum'])}; "
        f"at most {v(s['epochs'])} epochs" + (f" / {v(s['max_steps'])} steps" if s.get("max_steps") else "") + f", patience {v(s['patience'])}.",
        f"Early stopping on dev loss, dev = {e(early)}; the best-dev prompt is kept.",
        f"Train subsample: {v(s['max_train_examples']) if s.get('max_train_examples') else 'none (all of train)'}; data seed {v(s['data_seed'])}.",
        f"Seeds: {e(', '.join(map(str, s['seeds'])))} ({len(s['seeds'])} runs per task); transfer and similarity use seed "
        f"{v(results['protocol']['representative_seed'])}'s prompt for each task.",
        *[f"For {e(task.upper())} only: " + ", ".join(f"{e(k)} = {v(val)}" for k, val in keys.items()) + "."
          for task, keys in s.get("per_task", {}).items()],
        "Evaluation: official SuperGLUE val split" + (f", a seeded random subsample of {v(size)} examples per task" if (size := s.get("max_val_examples") or s.get("max_eval_examples")) else " in full") + ".",
    ]
    other_init = sorted(t.upper() for t, keys in s.get("per_task", {}).items() if keys.get("init", "text") != "text")
    if s["init"] == "text":
        items.append("With the text init every seed starts from the same prompt: seeds differ only in which examples "
                     "share a batch and in the order of the batches, so the spread over seeds measures sensitivity to "
                     "data order" + (f" (not for {e(', '.join(other_init))}, whose init is partly drawn per seed)." if other_init else "."))
    if failed:
        items.append(f'<span class="bad">Runs left out (not done): {e(", ".join(failed))}</span>')
    return ("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul><table><tr><th>task</th><th>train</th><th>dev</th><th>val</th>"
            f"<th>scored here</th></tr>{split_rows}</table>")


CAPTIONS = {
    "learn": "Figure: val accuracy per task with 95% bootstrap error bars: no prompt, the text prompt and the trained prompts' mean "
    "(dots: each seed); dotted line: the majority class.",
    "curves": "Figure: learning curves: dev loss (top) and dev accuracy (bottom) after each epoch, one line per seed "
    "(dotted: the majority class).",
    "tsne": "Figure: t-SNE map of every prompt (runs of a task connected, as in the paper's Figure 6). "
    "t-SNE keeps neighbourhoods, not distances.",
    "pca": "Figure: PCA of every prompt (a linear projection: distances are shrunk but not warped).",
    "similarity": "Figure: ||A-B||_F (the paper's Figure 7) and cosine similarity between the tasks' prompts.",
    "transfer": "Figure: gain of each task's prompt (rows) on each task (columns) over that task with no prompt "
    "(the paper's Figure 8), diagonal included.",
    "spot": "Figure: zero-shot transfer gain (left) beside the SPoT gain (right): a target trained briefly from the source's prompt, "
    "minus the same budget from its own init.",
    "ablation": "Figure: Lester et al.'s Figure 3 on this backbone: val accuracy against prompt length (log scale), one line per init.",
    "anchor": "Figure: val accuracy against faithfulness (rows whose nearest token is their anchor token), one line per task through "
    "its anchor weights G, with 95% Wilson intervals both ways.",
}


def interpretation_html(results: dict) -> str:
    """Issue 21's section: row importance with the persisted-vs-drifted test, what the reading keeps, elicited descriptions."""
    block = results.get("interpretation")
    if not block:
        return '<p class="note">Not computed (set the study key interpret = true).</p>'
    t = block["persisted_vs_drifted"]
    test = (f'<p class="note">Are rows that kept their init token more important than rows that drifted? Mean log-likelihood drop of '
            f'persisted minus drifted rows (vocabulary-mean replacement): {e(t["statistic"])}, one-sided permutation p = {e(t["p_value"])} '
            f'({"exact" if t["exact"] else "sampled"}, {t["permutations"]} relabellings within each prompt; {t["persisted"]} persisted and '
            f'{t["drifted"]} drifted rows from {t["prompts"]} prompts with both, seeds and tasks pooled).</p>')
    if block.get("examples"):
        test += (f'<p class="note">Scored on {", ".join(f"{n} {e(task)} examples" for task, n in sorted(block["examples"].items()))} '
                 f'of the eval set (study key interpret_examples: a seeded subsample), for {len(block["runs"])} prompt(s).</p>')
    rows, reading, said = [], [], []
    for name, f in block["runs"].items():
        for r in f["rows"]["rows"]:
            rows.append([name, r["rank"], r["position"], "yes" if r["persisted"] else "no", r["mean_accuracy_drop"], r["mean_loglik_drop"],
                         r["init_accuracy_drop"], r["init_loglik_drop"]])
        g = f["reading"]
        reading.append([name, g["trained"]["accuracy"], g["projected"]["accuracy"], g["hard_text"]["accuracy"], g["none"]["accuracy"],
                        g["kept_projected"], g["kept_hard_text"], g["text"]])
        for d in f["elicitation"]["final"]:
            faithful = d["faithfulness"] or {}
            said.append([name, "final", d["frame"], d["text"], faithful.get("hard_prompt_accuracy"), faithful.get("label_word_overlap")])
        for snap in f["elicitation"]["over_training"]:
            said += [[name, f"epoch {snap['epoch']}", frame, text, None, None] for frame, text in zip(block["frames"], snap["descriptions"])]
    tables = [
        Table("interpretation_rows", "Row importance: what the prompt loses when one row is replaced",
              ["run", "rank", "pos", "kept init token", "mean: acc drop", "mean: loglik drop", "init: acc drop", "init: loglik drop"], rows,
              "Drops: trained minus ablated, on the study's eval set (accuracy points; gold-choice log-likelihood in nats); ranked by the mean replacement's log-likelihood drop."),
        Table("interpretation_reading", "What the nearest-token reading keeps",
              ["run", "trained", "projected", "hard text", "no prompt", "kept (projected)", "kept (hard text)", "reading"], reading,
              "Accuracy; kept = (reading - no prompt) / (trained - no prompt): 1 all of the gain, 0 none, – no gain to keep."),
        Table("interpretation_descriptions", "What the model says its prompt means (greedy, elicited in each frame)",
              ["run", "prompt", "frame", "description", "as a hard prompt: acc", "label-word overlap"], said,
              f"At most {block['max_new_tokens']} tokens per description; faithfulness scored for the final prompt."),
    ]
    return test + "".join(table_html(table) for table in tables)


def render(results: dict, figs: dict[str, bytes], tables: list[Table]) -> str:
    by_name = {t.name: t for t in tables}
    section = lambda *names: "".join(table_html(by_name[n]) for n in names if n in by_name)  # noqa: E731
    fig = lambda name: figure_html(name, figs[name], CAPTIONS[name]) if name in figs else ""  # noqa: E731
    stoch_note = results["stochasticity"].get("maps_note", "")
    title = results.get("title") or "softprompt study"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>
<h1>{e(title)}</h1>
<p class="note">Reproduces "Interpreting Prompt-Tuning Across SuperGLUE Tasks" (Dayton, O'Rahilly, Werner) with softprompt,
plus Lester et al.'s prompt ensembling. Every number below is in results.json and the CSV files beside this report.</p>
<h2>Does it learn?</h2>{fig('learn')}
<ul>{''.join(learning.verdict_lines(results))}</ul>{section('paired_tests', 'val_examples')}
{fig('curves')}
{section('budget')}
<h3>Machine and time</h3>{learning.machine_html(results)}
<h2>Verdict</h2><ul>{''.join(verdicts(results))}</ul>
<h2>Protocol</h2>{protocol_html(results)}
<h2>Accuracy</h2>{section('accuracy_intervals', 'accuracy', 'zero_shot', 'ensemble')}
<h2>What the prompts say: nearest tokens</h2>{tokens_html(results)}
<h2>What the prompts learned: rows, the reading, descriptions</h2>{interpretation_html(results)}
<h2>Stochasticity over seeds</h2>{section('stochasticity')}
{fig('tsne')}
{fig('pca')}
<p class="note">{e(stoch_note)}</p>{section('task_distances')}
<h2>Similarity between tasks</h2>{fig('similarity')}
{section('similarity', 'cosine', 'similarity_centroids')}
<h2>Zero-shot task transfer</h2>{fig('transfer')}
{section('transfer_gain_exact_match', 'transfer_beside_paper', 'transfer_gain_accuracy', 'transfer_accuracy', 'transfer_exact_match', 'correlation')}
<h2>SPoT: transfer with training</h2>{fig('spot')}
{section('spot_gain', 'spot_accuracy', 'spot_default')}
<h2>Which similarity predicts transfer?</h2>{section('similarity_measures', 'similarity_average_token_cosine', 'similarity_per_token_cosine', 'similarity_neuron_overlap')}
<h2>Drift over training</h2>{section('drift') if results.get('drift') else '<p class="note">No run saved snapshots (set the training key snapshot_every).</p>'}
<h2>Lester's ablation: prompt length and init</h2>{fig('ablation')}
{section('ablation')}
{anchor.section_html(results.get('anchor'), fig('anchor'), section('anchor'))}
<h2>Runs</h2>{section('runs')}
</body></html>
"""


def write_report(study_dir: str | Path) -> Path:
    """Write every CSV table, every PNG figure and report.html for a study folder; returns the report's path.

    Raises:
        FileNotFoundError: no results.json (run `softprompt study` first).
    """
    study_dir = Path(study_dir)
    path = study_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {study_dir}; run `softprompt study CONFIG --out {study_dir}` first")
    results = json.loads(path.read_text())
    tables = all_tables(results)
    for table in tables:
        atomic_write_bytes(study_dir / f"{table.name}.csv", to_csv(table))
    figs = figures(results)
    for name, png in figs.items():
        atomic_write_bytes(study_dir / f"{name}.png", png)
    atomic_write_bytes(study_dir / REPORT_FILE, render(results, figs, tables).encode())
    return study_dir / REPORT_FILE
