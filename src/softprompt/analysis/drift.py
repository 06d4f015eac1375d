"""Drift: how a prompt's nearest tokens move away from its init over training, from saved snapshots.

For each snapshot (the init at epoch 0, then every `snapshot_every` epochs) and each prompt row:
the nearest vocabulary token by cosine; whether it is still the init token ("persisted"); whether
its script left the init token's script (e.g. Latin -> Arabic; `Common` tokens, which are
punctuation, digits and spaces, count as no script and never "leave"); and whether the token is a
word meaning "correct"/"accurate" in a small hand-written list (`CORRECT_WORDS`).

The word list is honest only as far as it goes: a token counts when, stripped of spaces and
punctuation and case-folded, it equals a listed word exactly. Sub-word pieces ("corr") and
languages not listed are missed, so a zero means "none of these words", not "no such meaning".
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from softprompt.analysis.interpret import COMMON, nearest_tokens_in_model, readable, script_of

# "correct" / "accurate" / "right (answer)" in the languages the paper saw drift into, plus a few
# common ones; written from standard dictionary translations (no corpus or model was used).
CORRECT_WORDS = {
    "English": ("correct", "accurate", "right", "exact", "true"),
    "French": ("correct", "correcte", "exact", "exacte", "juste", "précis", "précise", "vrai"),
    "Spanish": ("correcto", "correcta", "exacto", "exacta", "preciso", "precisa", "verdadero"),
    "German": ("richtig", "korrekt", "genau", "wahr"),
    "Arabic": ("صحيح", "دقيق", "صح"),
    "Farsi": ("درست", "صحیح", "دقیق"),
    "Hindi": ("सही", "सटीक"),
    "Punjabi": ("ਸਹੀ", "ਠੀਕ"),
    "Kannada": ("ಸರಿ", "ನಿಖರ"),
    "Chinese": ("正确", "準確", "准确", "对", "對", "正確"),
    "Japanese": ("正しい", "正確"),
    "Russian": ("правильно", "правильный", "верно", "точно", "точный"),
}
_WORD_LANGUAGES: dict[str, list[str]] = {}
for _language, _words in CORRECT_WORDS.items():
    for _word in _words:
        _WORD_LANGUAGES.setdefault(_word.casefold(), []).append(_language)


def correct_word_languages(token: str) -> list[str]:
    """The languages in which `token` (stripped of spaces/punctuation, case-folded) is a listed "correct" word."""
    core = "".join(c for c in token if unicodedata.category(c)[0] in "LMN").casefold()
    return _WORD_LANGUAGES.get(core, [])


@dataclass(frozen=True)
class Snapshot:
    epoch: int
    step: int
    prompt: Tensor  # [P, H]


def drift(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, snapshots: list[Snapshot], init_ids: list[int] | None) -> dict:
    """Nearest-token drift of one prompt over its snapshots (sorted by step).

    Args:
        snapshots: the prompt at several points of training; the first should be the init (step 0).
        init_ids: the token each row started on (run.json's `init_ids`); None (random init): the
            first snapshot's nearest tokens stand in.

    Returns:
        JSON-ready: per snapshot `epoch`, `step`, `persisted`, `left_script` (row counts), `scripts`
        (script -> rows), `correct_rows` (`[row, token, languages]`) and `tokens` (top-1 per row);
        per row `left_at_step`: the first snapshot step whose nearest token is not the init token (None: never).
    """
    snapshots = sorted(snapshots, key=lambda s: s.step)
    top1 = [nearest_tokens_in_model(model, s.prompt, 1)[1][:, 0].tolist() for s in snapshots]
    start = init_ids if init_ids is not None else top1[0]
    decode = lambda i: tokenizer.decode([i])  # noqa: E731
    init_scripts = [script_of(decode(i)) for i in start]
    rows = len(start)
    out: dict = {"num_rows": rows, "init_tokens": [readable(decode(i)) for i in start], "snapshots": []}
    left_at: list[int | None] = [None] * rows
    for snap, ids in zip(snapshots, top1):
        texts = [decode(i) for i in ids]
        scripts = [script_of(t) for t in texts]
        left = [p for p in range(rows) if scripts[p] not in (COMMON, init_scripts[p])]
        correct = [[p, readable(texts[p]), langs] for p in range(rows) if (langs := correct_word_languages(texts[p]))]
        for p in range(rows):
            if left_at[p] is None and ids[p] != start[p]:
                left_at[p] = snap.step
        out["snapshots"].append({
            "epoch": snap.epoch, "step": snap.step,
            "persisted": sum(ids[p] == start[p] for p in range(rows)),
            "left_script": len(left),
            "scripts": dict(Counter(scripts).most_common()),
            "correct_rows": correct,
            "tokens": [readable(t) for t in texts],
        })
    out["left_at_step"] = left_at
    return out
