"""Drift of nearest tokens over snapshots, on a tiny model whose prompt rows are set to known token embeddings."""

from __future__ import annotations

from softprompt.analysis.drift import Snapshot, correct_word_languages, drift
from softprompt.core.prompt import embed_ids

CORRECT, THE, ALIF = 2887, 260, 10805  # SmolLM2 ids of " correct", " the", "ا" (Arabic)


def test_drift_counts_persisted_rows_scripts_and_when_rows_left(tiny_backbone):
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    snapshots = [
        Snapshot(0, 0, embed_ids(model, [CORRECT, THE])),
        Snapshot(2, 10, embed_ids(model, [ALIF, THE])),
        Snapshot(4, 20, embed_ids(model, [ALIF, CORRECT])),
    ]
    out = drift(model, tokenizer, snapshots[::-1], init_ids=[CORRECT, THE])  # sorted by step inside
    assert [s["step"] for s in out["snapshots"]] == [0, 10, 20]
    assert [s["persisted"] for s in out["snapshots"]] == [2, 1, 0]
    assert [s["left_script"] for s in out["snapshots"]] == [0, 1, 1]  # Latin -> Arabic; " correct" stays Latin
    assert out["snapshots"][1]["scripts"] == {"Arabic": 1, "Latin": 1}
    assert out["left_at_step"] == [10, 20]
    assert out["init_tokens"] == ["␣correct", "␣the"]
    assert out["snapshots"][0]["correct_rows"] == [[0, "␣correct", ["English", "French"]]]
    assert out["snapshots"][2]["correct_rows"] == [[1, "␣correct", ["English", "French"]]]


def test_random_init_measures_against_the_first_snapshot(tiny_backbone):
    model = tiny_backbone.model
    out = drift(model, tiny_backbone.tokenizer, [Snapshot(0, 0, embed_ids(model, [THE])), Snapshot(1, 5, embed_ids(model, [THE]))], None)
    assert [s["persisted"] for s in out["snapshots"]] == [1, 1] and out["left_at_step"] == [None]


def test_correct_words_match_whole_tokens_only():
    assert correct_word_languages(" Richtig,") == ["German"]
    assert correct_word_languages("صحيح") == ["Arabic"]
    assert correct_word_languages("corr") == [] and correct_word_languages("incorrect") == []
