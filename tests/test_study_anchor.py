"""The study's anchor sweep (`anchor_weights`): runs at the sweep's budget, the trade-off in results.json, the report's section."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE_DATA
from softprompt.analysis.statistics import wilson_interval
from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import load_prompt, read_run
from softprompt.report.html import write_report
from softprompt.study.anchor import anchor_results, weight_name
from softprompt.study.budget import check_budgets
from softprompt.study.config import StudyConfig
from softprompt.study.pipeline import run_study
from softprompt.tasks.registry import TASKS
from softprompt.train.anchor import anchor_embeddings
from test_study import Images

SECTION = "Readable by construction: the anchor trade-off"
HUGE = 1000.0


def anchor_study(model: Path, **overrides) -> StudyConfig:
    # The grid is cheap (8 examples, 1 epoch); the sweep trains longer on all 20 train rows, so its overrides show in run.json.
    # lr 0.01 is small beside the tiny model's embeddings (std 0.02): Adam moves a row ~lr a step whatever G is, so only then
    # does a large G hold every row on its token (tests/test_anchor_training.py), while G = 0 drifts off some in 3 epochs.
    data = dict(tasks=["cb", "rte"], seeds=[0], model=str(model), num_tokens=4, lr=0.01, epochs=1, patience=3, max_train_examples=8,
                batch_size=4, min_dev_examples=4, eval_batch_size=8, top_k=2, device="cpu", max_val_examples=5, spot_steps=0, probe_examples=0,
                anchor_weights=[0.0, HUGE], anchor_tasks=["cb"], anchor_epochs=3, anchor_max_train_examples=20)
    return StudyConfig.from_dict(data | overrides)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("anchor-study")
    run_study(anchor_study(tiny_model_dir), out, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    return out, json.loads((out / "results.json").read_text())


def test_sweep_trains_each_anchor_task_at_every_weight_with_its_own_budget(study):
    out, _ = study
    assert sorted(p.name for p in (out / "anchor").iterdir()) == ["cb-g0", "cb-g1000"]  # rte is not an anchor task
    grid = read_run(out / "runs" / "cb-s0")
    for name, weight in (("cb-g0", 0.0), ("cb-g1000", HUGE)):
        record = read_run(out / "anchor" / name)
        assert record["status"] == "done" and record["anchor"]["weight"] == weight
        assert (record["config"]["epochs"], record["config"]["max_train_examples"], record["data"]["train"]) == (3, 20, 20)
        assert record["config"]["seed"] == 0 and record["config"]["lr"] == grid["config"]["lr"]  # the representative seed's config
    assert (grid["config"]["epochs"], grid["data"]["train"], grid["anchor"]["weight"]) == (1, 8, 0.0)  # the grid run is not the G = 0 point


def test_a_huge_weight_holds_every_row_on_its_anchor_token(study):
    _, results = study
    zero, huge = results["anchor"]["points"]["cb"]
    assert huge["faithfulness"]["estimate"] == 100.0 and huge["rows_on_anchor"] == 4
    assert zero["faithfulness"]["estimate"] < 100.0  # without the pull some rows leave their token: the curve has two ends
    assert huge["distance"] < zero["distance"] / 10


def test_each_point_is_read_from_its_run(study, tiny_model_dir):
    out, results = study
    block = results["anchor"]
    assert (block["tasks"], block["weights"], block["missing"]) == (["cb"], [0.0, HUGE], [])
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    anchor = anchor_embeddings(backbone.model, backbone.tokenizer, TASKS["cb"].init_text, 4)  # [P, H]: the default anchor is the init text
    for point, name in zip(block["points"]["cb"], ("cb-g0", "cb-g1000")):
        record = read_run(out / "anchor" / name)
        prompt, _ = load_prompt(out / "anchor" / name)
        assert point["run"] == f"anchor/{name}" and point["steps"] == record["steps"] > 5  # more than the grid's one epoch of 2 steps
        assert point["accuracy"]["estimate"] == pytest.approx(record["val"]["accuracy"]) and point["accuracy"]["n"] == 5
        assert point["accuracy"] == asdict(wilson_interval(round(record["val"]["accuracy"] * 5 / 100), 5))
        assert point["faithfulness"]["estimate"] == pytest.approx(100 * record["faithfulness"]) and point["faithfulness"]["n"] == 4
        assert point["distance"] == pytest.approx(math.sqrt(float(((prompt - anchor) ** 2).sum(-1).mean())), rel=1e-5)


def test_report_has_the_section_figure_and_table(study):
    out, results = study
    page = (out / "report.html").read_text()
    assert SECTION in page and "the largest G (1000)" in page
    parser = Images()
    parser.feed(page)
    assert parser.figures["anchor"].startswith("data:image/png;base64,") and (out / "anchor.png").stat().st_size > 1000
    lines = (out / "anchor.csv").read_text().splitlines()
    assert lines[0].startswith("task,G,accuracy,95% low,95% high,faithfulness (% rows)") and [line.split(",")[:2] for line in lines[1:]] == [["cb", "0"], ["cb", "1000"]]
    assert lines[2].split(",")[5] == "100.0"


def test_report_leaves_the_section_out_when_the_sweep_did_not_run(study, tmp_path):
    out, results = study
    without = {k: v for k, v in results.items() if k != "anchor"}
    (tmp_path / "results.json").write_text(json.dumps(without))
    page = write_report(tmp_path).read_text()
    assert SECTION not in page and not (tmp_path / "anchor.png").exists() and not (tmp_path / "anchor.csv").exists()


def test_rerun_reuses_the_sweep_runs(study, tiny_model_dir):
    out, results = study
    stamps = {p: p.stat().st_mtime_ns for p in (out / "anchor").glob("*/*")}
    again = run_study(anchor_study(tiny_model_dir), out, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["anchor"]["points"] == results["anchor"]["points"]


def test_unfinished_runs_are_listed_not_fatal(study, tiny_model_dir, tmp_path):
    out, _ = study
    shutil.copytree(out / "anchor" / "cb-g0", tmp_path / "anchor" / "cb-g0")
    shutil.copytree(out / "anchor" / "cb-g1000", tmp_path / "anchor" / "cb-g1000")
    record = read_run(tmp_path / "anchor" / "cb-g1000")
    (tmp_path / "anchor" / "cb-g1000" / "run.json").write_text(json.dumps({**record, "status": "diverged"}))
    block = anchor_results(load_backbone(str(tiny_model_dir), "cpu"), ("cb",), (0.0, HUGE, 5.0), tmp_path)
    assert block["missing"] == ["anchor/cb-g1000: diverged", "anchor/cb-g5: not trained"]
    assert block["points"]["cb"][0]["run"] == "anchor/cb-g0" and block["points"]["cb"][1:] == [None, None]


@pytest.mark.parametrize(("weight", "name"), [(0.0, "g0"), (0.03, "g0.03"), (1.0, "g1"), (1000.0, "g1000"), (1e-5, "g1e-05"), (0.1 + 0.2, "g0.30000000000000004")],
                         ids=["zero", "small", "one", "large", "tiny", "inexact"])
def test_weight_names_are_stable_and_distinct(weight, name):
    assert weight_name(weight) == name


def test_anchor_keys_are_resolved():
    config = StudyConfig.from_dict(dict(tasks=["cb", "rte"], seeds=[0], anchor_weights=[0, 1]))
    assert config.anchor_weights == (0.0, 1.0) and config.anchor_tasks == ("cb", "rte")  # ints read as floats; every task by default
    assert (config.anchor_epochs, config.anchor_max_train_examples) == (None, None)
    assert StudyConfig.from_dict(dict(tasks=["cb"], seeds=[0])).anchor_tasks == ()  # stage off


@pytest.mark.parametrize(
    ("change", "message"),
    [({"anchor_weights": [0.0, -1.0]}, r"`anchor_weights` must list finite numbers >= 0, got \[-1.0\]"),
     ({"anchor_weights": [float("nan")]}, r"`anchor_weights` must list finite numbers >= 0, got \[nan\]"),
     ({"anchor_weights": [float("inf")]}, r"`anchor_weights` must list finite numbers >= 0, got \[inf\]"),
     ({"anchor_weights": [1.0, 1]}, r"`anchor_weights` lists a weight twice: \[1.0, 1.0\]"),
     ({"anchor_weights": ["big"]}, "key `anchor_weights` must be tuple"),
     ({"anchor_weights": [1.0], "anchor_tasks": ["copa"]}, r"`anchor_tasks` has \['copa'\], not in `tasks` \['cb', 'rte'\]"),
     ({"anchor_weights": [1.0], "anchor_tasks": ["cb", "cb"]}, "`anchor_tasks` lists a task twice"),
     ({"anchor_tasks": ["cb"]}, r"study key\(s\) `anchor_tasks` need `anchor_weights`"),
     ({"anchor_weights": [1.0], "anchor_epochs": 0}, "`anchor_epochs` must be at least 1 .*got 0"),
     ({"anchor_weights": [1.0], "anchor_max_train_examples": 1.5}, "key `anchor_max_train_examples` must be int, got 1.5")],
    ids=["negative", "nan", "inf", "twice", "type", "task-not-in-tasks", "task-twice", "tasks-without-weights", "epochs", "max-train-type"],
)
def test_anchor_keys_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(dict(tasks=["cb", "rte"], seeds=[0]) | change)


def test_sweep_budget_must_fit_the_train_split():
    config = StudyConfig.from_dict(dict(tasks=["cb"], seeds=[0], min_dev_examples=4, anchor_weights=[0.0], anchor_max_train_examples=21))
    with pytest.raises(ValueError, match="`anchor_max_train_examples` = 21 does not fit: cb's train split after the dev slice has 20 examples"):
        check_budgets(config, FIXTURE_DATA)


def test_the_anchor_study_config_sweeps_cb_and_copa():
    config = StudyConfig.from_toml(Path(__file__).resolve().parents[1] / "studies" / "anchor.toml")
    assert config.anchor_weights == (0.0, 0.01, 0.1, 1.0) and config.anchor_tasks == ("cb", "copa") == config.tasks
    assert (config.spot_steps, config.probe_examples, config.seeds) == (0, 0, (0,))
