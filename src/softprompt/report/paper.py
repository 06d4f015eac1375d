"""Reference numbers, in one place: the paper's tables and the rates measured here on SmolLM2.

The majority-class rates can be recomputed from the data (`softprompt tasks` does); they are kept
here for the report's table, which reads results files and never the data.
"""

from __future__ import annotations

# "Interpreting Prompt-Tuning Across SuperGLUE Tasks", Table 1 (bloomz-560m, 4 runs per task):
# mean Frobenius norm, variance of the prompts.
PAPER_TABLE1 = {"cb": (119.2, 1.31), "rte": (107.7, 3.5), "copa": (111.2, 38.5), "wsc": (135.3, 3.8)}
# Its Table 2: zero-shot median / max accuracy over prompts, from the BLOOMZ paper.
PAPER_TABLE2 = {"copa": (55, 67), "cb": (43, 61), "wsc": (51, 52), "rte": (53, 54)}
# Majority-class rate of each full val split, in percent (`softprompt tasks`; MultiRC over answers).
MAJORITY_CLASS = {"cb": 50.0, "rte": 52.7, "copa": 55.0, "wsc": 63.5, "wic": 50.0, "multirc": 57.2, "boolq": 62.2}
# Zero-shot (no prompt) val accuracy of SmolLM2-135M-Instruct with the built-in task files (SPEC.md; README).
ZERO_SHOT_SMOLLM2 = {"cb": 26.8, "rte": 55.6, "copa": 62.0, "wsc": 63.5}
