"""The paper's reference numbers, in one place, for the report's tables.

Numbers measured here are not kept here: the majority-class rate of the scored eval set is in
results.json (`tasks.registry.majority_rate`, as `softprompt tasks` reports it for a whole split).
"""

from __future__ import annotations

# "Interpreting Prompt-Tuning Across SuperGLUE Tasks", Table 1 (bloomz-560m, 4 runs per task):
# mean Frobenius norm, variance of the prompts.
PAPER_TABLE1 = {"cb": (119.2, 1.31), "rte": (107.7, 3.5), "copa": (111.2, 38.5), "wsc": (135.3, 3.8)}
# Its Table 2: zero-shot median / max accuracy over prompts, from the BLOOMZ paper.
PAPER_TABLE2 = {"copa": (55, 67), "cb": (43, 61), "wsc": (51, 52), "rte": (53, 54)}
# Its protocol (section 5.2 and the training notes): 4 runs per task of at most 50 epochs, early stopping on
# the evaluation loss with patience 5, on these four tasks. studies/paper.toml encodes it (a test checks).
PAPER_PROTOCOL = {"tasks": ("cb", "rte", "copa", "wsc"), "seeds": 4, "epochs": 50, "patience": 5}
# Its Figure 8: exact-match gain of the row task's prompt on the column task over no prompt, in points.
# Only one cell is given in the text ("the top right cell ... +0.4 ... evaluate copa ... using the soft-prompt
# generated in CB"); the rest is in the figure's image, which the text does not carry: unknown cells are absent.
PAPER_TRANSFER_GAIN = {("cb", "copa"): 0.4}
