"""The study's interpretation stage (`interpret = true`): per-run findings in results.json, and the pooled test."""

from __future__ import annotations

import html
import json
import math
import random
from dataclasses import asdict

import pytest

from conftest import FIXTURE_DATA
from softprompt.analysis.elicit import FRAMES, elicit
from softprompt.analysis.findings import row_table
from softprompt.analysis.interpret import interpret_prompt
from softprompt.analysis.rows import init_embeddings, persisted_vs_drifted, row_importance
from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import load_prompt, read_run
from softprompt.report.html import fmt, interpretation_html
from softprompt.study.config import StudyConfig
from softprompt.study.pipeline import run_study
from softprompt.study.interpretation import pooled_persistence
from softprompt.study.score_cache import eval_set
from test_study import tiny_study

QUICK = dict(interpret=True, spot_steps=0, ablation_lengths=[], ablation_inits=[], probe_examples=0)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("study")
    config = tiny_study(tiny_model_dir, **QUICK)
    run_study(config, out, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    return config, out, json.loads((out / "results.json").read_text())


def test_interpretation_has_every_run_with_num_tokens_rows(study):
    config, _, results = study
    block = results["interpretation"]
    assert set(block) == {"runs", "persisted_vs_drifted", "frames", "max_new_tokens", "examples"}
    assert block["examples"] == {"cb": 5, "rte": 5}  # no `interpret_examples`: the study's whole eval set
    assert set(block["runs"]) == {f"{t}-s{s}" for t in config.tasks for s in config.seeds}
    for finding in block["runs"].values():
        assert set(finding) == {"task", "seed", "rows", "reading", "elicitation"}
        assert len(finding["rows"]["rows"]) == 4  # num_tokens
        assert sorted(r["position"] for r in finding["rows"]["rows"]) == [0, 1, 2, 3]
        assert all(r["init_loglik_drop"] is not None for r in finding["rows"]["rows"])  # text init: both replacements
        assert [d["frame"] for d in finding["elicitation"]["final"]] == list(FRAMES)
        assert [s["epoch"] for s in finding["elicitation"]["over_training"]] == [0, 1]  # snapshot_every = 1, one epoch


def test_findings_are_the_library_functions_on_the_study_eval_set(study, tiny_model_dir):
    config, out, results = study
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    name = "rte-s1"
    record, (prompt, _) = read_run(out / "runs" / name), load_prompt(out / "runs" / name, hidden_size=backbone.hidden_size)
    _, items = eval_set("rte", config, backbone.tokenizer, FIXTURE_DATA)
    assert len(items) == 5  # max_val_examples: the study's subsample, not the whole split
    persisted = [r.persisted for r in interpret_prompt(backbone.model, backbone.tokenizer, prompt, record["init_ids"], k=1)]
    expected = row_table(row_importance(backbone, prompt, items, init_embeddings(backbone.model, record["init_ids"]), 8), persisted)
    assert json.dumps(results["interpretation"]["runs"][name]["rows"], sort_keys=True) == json.dumps(expected, sort_keys=True)
    texts = [d["text"] for d in results["interpretation"]["runs"][name]["elicitation"]["final"]]
    assert texts == [e.text for e in elicit(backbone, prompt)]


def test_interpret_keys_choose_the_runs_and_a_seeded_share_of_the_eval_set(tmp_path, tiny_model_dir):
    """`interpret_tasks`, `interpret_seeds` and `interpret_examples` size the stage: one run read, on 3 of its 5 items."""
    config = tiny_study(tiny_model_dir, **QUICK, interpret_tasks=["rte"], interpret_seeds=[1], interpret_examples=3)
    results = run_study(config, tmp_path, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    block = results["interpretation"]
    assert set(block["runs"]) == {"rte-s1"} and block["examples"] == {"rte": 3}
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    _, items = eval_set("rte", config, backbone.tokenizer, FIXTURE_DATA)
    share = [items[i] for i in sorted(random.Random(0).sample(range(5), 3))]
    assert share != items[:3]  # seeded, not the first three (the fixture's first items share a label)
    record, (prompt, _) = read_run(tmp_path / "runs" / "rte-s1"), load_prompt(tmp_path / "runs" / "rte-s1", hidden_size=backbone.hidden_size)
    persisted = [r.persisted for r in interpret_prompt(backbone.model, backbone.tokenizer, prompt, record["init_ids"], k=1)]
    expected = row_table(row_importance(backbone, prompt, share, init_embeddings(backbone.model, record["init_ids"]), 8), persisted)
    assert json.dumps(block["runs"]["rte-s1"]["rows"], sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_the_pooled_test_pools_every_run(study):
    _, _, results = study
    runs = results["interpretation"]["runs"].values()
    by_position = [sorted(f["rows"]["rows"], key=lambda r: r["position"]) for f in runs]
    expected = persisted_vs_drifted([[r["mean_loglik_drop"] for r in rows] for rows in by_position],
                                    [[r["persisted"] for r in rows] for rows in by_position])
    got = results["interpretation"]["persisted_vs_drifted"]
    assert got["importance"] == "mean_loglik_drop"
    assert got["persisted"] + got["drifted"] <= 4 * len(by_position)
    for key, value in asdict(expected).items():
        assert (math.isnan(value) and got[key] is None) or got[key] == value, key


def test_pooling_relabels_within_each_prompt():
    """One prompt whose persisted rows are its two most important: 1 of the C(4, 2) = 6 relabellings reaches it."""
    rows = lambda drops, kept: {"rows": {"rows": [{"position": p, "mean_loglik_drop": d, "persisted": k}  # noqa: E731
                                                   for p, (d, k) in reversed(list(enumerate(zip(drops, kept))))]}}
    runs = {"cb-s0": rows([4.0, 3.0, 2.0, 1.0], [True, True, False, False]), "cb-s1": rows([9.0, 9.0], [True, True])}
    test = pooled_persistence(runs)
    assert (test["prompts"], test["persisted"], test["drifted"]) == (1, 2, 2)  # cb-s1 compares nothing: all persisted
    assert test["p_value"] == pytest.approx(1 / 6) and test["exact"]
    assert test["statistic"] == pytest.approx(3.5 - 1.5)


def test_interpret_key_is_type_checked_and_off_by_default(tiny_model_dir):
    assert tiny_study(tiny_model_dir).interpret is False
    with pytest.raises(ValueError, match="key `interpret` must be bool, got 'yes'"):
        StudyConfig.from_dict(dict(tasks=["cb"], seeds=[0], interpret="yes"))


def test_report_shows_the_rows_the_test_the_reading_and_the_descriptions(study):
    _, out, results = study
    page = (out / "report.html").read_text()
    block = results["interpretation"]
    section = page[page.index("What the prompts learned"):page.index("Stochasticity over seeds")]
    p = block["persisted_vs_drifted"]["p_value"]
    assert f"one-sided permutation p = {html.escape(fmt(p))}" in section
    assert section.count("<tr>") == 3 + sum(4 + 1 + 3 * (1 + len(f["elicitation"]["over_training"])) for f in block["runs"].values())
    for f in block["runs"].values():
        assert html.escape(f["reading"]["text"]) in section
        assert all(html.escape(d["text"]) in section for d in f["elicitation"]["final"])
    assert "Not computed" not in section


def test_report_without_the_stage_says_how_to_turn_it_on():
    assert "interpret = true" in interpretation_html({})
