"""The report's section "Readable by construction: the anchor trade-off": accuracy against faithfulness as G grows.

Reads results.json's `anchor` block (written by `softprompt.study.anchor`): per task and anchor weight G,
val accuracy and faithfulness (rows whose nearest token is their anchor token), each with a 95% Wilson
interval, and the rows' distance to the anchor. The figure is returned as a matplotlib figure.
"""

from __future__ import annotations

import html

import matplotlib.pyplot as plt
import numpy as np

from softprompt.report.tables import Table, fmt
from softprompt.train.anchor import weight_text

TITLE = "Readable by construction: the anchor trade-off"


def _finished(block: dict, task: str) -> list[dict]:
    return [p for p in block["points"][task] if p is not None]


def anchor_figure(block: dict) -> plt.Figure:
    """Accuracy (y) against faithfulness (x), one line per task in order of G, each point labelled with its G; 95% bars both ways."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    for i, task in enumerate(block["tasks"]):
        points = _finished(block, task)
        if not points:
            continue
        x = np.array([p["faithfulness"]["estimate"] for p in points])
        y = np.array([p["accuracy"]["estimate"] for p in points])
        # [2, N]: distance from the estimate to each end of the interval
        xerr = [[p["faithfulness"]["estimate"] - p["faithfulness"]["low"] for p in points], [p["faithfulness"]["high"] - p["faithfulness"]["estimate"] for p in points]]
        yerr = [[p["accuracy"]["estimate"] - p["accuracy"]["low"] for p in points], [p["accuracy"]["high"] - p["accuracy"]["estimate"] for p in points]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=f"C{i}", marker="o", capsize=3, lw=1.2, elinewidth=0.8, label=task.upper())
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"G={weight_text(p['weight'])}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8, color=f"C{i}")
    ax.set_xlim(-5, 105)
    ax.set_ylim(0, 100)
    ax.set_xlabel("faithfulness: rows whose nearest token is their anchor token (%)")
    ax.set_ylabel("val accuracy (%)")
    ax.legend(frameon=False, fontsize=8)
    return fig


def anchor_table(block: dict) -> Table:
    rows = []
    for task in block["tasks"]:
        for g, p in zip(block["weights"], block["points"][task]):
            if p is None:
                rows.append([task, weight_text(g), *[None] * 9])
                continue
            acc, faithful = p["accuracy"], p["faithfulness"]
            rows.append([task, weight_text(g), acc["estimate"], acc["low"], acc["high"], faithful["estimate"], faithful["low"], faithful["high"],
                         f"{p['rows_on_anchor']}/{faithful['n']}", p["distance"], p["steps"]])
    columns = ["task", "G", "accuracy", "95% low", "95% high", "faithfulness (% rows)", "95% low", "95% high", "rows on anchor",
               "distance to anchor", "steps"]
    note = ("Each run: the task's representative-seed config at the sweep's budget, plus G * mean over rows ||p_i - e_i||^2 in the loss, e the "
            "anchor text's token embeddings. Accuracy on the study's val examples with a 95% Wilson interval from the count; faithfulness with a 95% "
            "Wilson interval over the P rows; distance = sqrt(mean over rows ||p_i - e_i||^2) of the saved prompt. – : the run did not finish.")
    return Table("anchor", "Accuracy and faithfulness at each anchor weight G", columns, rows, note)


def reading_lines(block: dict) -> list[str]:
    """One plain sentence per task: does the largest G keep accuracy within the smallest G's interval, and what does it buy?"""
    lines = []
    for task in block["tasks"]:
        points = sorted(_finished(block, task), key=lambda p: p["weight"])
        if len(points) < 2:
            lines.append(f'<li class="bad">{html.escape(task.upper())}: fewer than two weights finished; no curve to read.</li>')
            continue
        low, high = points[0], points[-1]
        ref, acc = low["accuracy"], high["accuracy"]["estimate"]
        where = "within" if ref["low"] <= acc <= ref["high"] else ("below" if acc < ref["low"] else "above")
        verdict = {"within": "keeps accuracy within", "below": "loses accuracy: it falls below", "above": "gains accuracy: it rises above"}[where]
        text = (f"{task.upper()}: the largest G ({weight_text(high['weight'])}) {verdict} the G = {weight_text(low['weight'])} interval "
                f"({fmt(acc)} against {fmt(ref['estimate'])} [{fmt(ref['low'])}–{fmt(ref['high'])}]), while the rows on their anchor token go "
                f"from {low['rows_on_anchor']} to {high['rows_on_anchor']} of {high['faithfulness']['n']} and their distance to the anchor from "
                f"{fmt(low['distance'])} to {fmt(high['distance'])}.")
        lines.append(f'<li class="{"bad" if where == "below" else "good"}">{html.escape(text)}</li>')
    return lines


def section_html(block: dict | None, figure: str, table: str) -> str:
    """The section, with the figure's and the table's HTML already rendered; empty when the sweep did not run."""
    if not block:
        return ""
    missing = "".join(f'<li class="bad">Not finished: {html.escape(m)}</li>' for m in block["missing"])
    return f"<h2>{html.escape(TITLE)}</h2>{figure}<ul>{''.join(reading_lines(block))}{missing}</ul>{table}"
