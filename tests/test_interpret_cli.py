"""`softprompt interpret RUN --rows / --project / --elicit` end to end on a tiny run folder: what it prints and
writes is what the library functions return for the same prompt and examples."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from conftest import FIXTURE_DATA
from softprompt.analysis.elicit import FRAMES, elicit, elicit_over_training
from softprompt.analysis.findings import load_snapshots, row_table
from softprompt.analysis.interpret import interpret_run
from softprompt.analysis.reading import what_reading_keeps
from softprompt.analysis.rows import init_embeddings, row_importance
from softprompt.backbones.loading import load_backbone
from softprompt.cli import app
from softprompt.data.batch import encode
from softprompt.io.runs import RUN_FILE, load_prompt, read_run
from softprompt.tasks.registry import TASKS, load_examples

NUM_TOKENS = 4
LIMIT = 4


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A CB run of 2 epochs on the tiny model, with snapshots after the init and each epoch."""
    out = tmp_path_factory.mktemp("runs") / "cb-s0"
    result = invoke("train", "--task", "cb", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, "--num-tokens", NUM_TOKENS,
                    "--epochs", 2, "--min-dev-examples", 6, "--device", "cpu", "--snapshot-every", 1, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def library(tiny_model_dir, run_dir):
    """The backbone, prompt and first LIMIT encoded CB val examples, as the library sees them."""
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    prompt, _ = load_prompt(run_dir, hidden_size=backbone.hidden_size)
    items = [encode(backbone.tokenizer, e, 256) for e in load_examples(TASKS["cb"], "val", FIXTURE_DATA)[:LIMIT]]
    return backbone, prompt, items


def interpret(run_dir, tmp_path, *flags):
    out = tmp_path / "findings.json"
    result = invoke("interpret", run_dir, "--device", "cpu", "--data-dir", FIXTURE_DATA, "--limit", LIMIT, *flags, "--json", out)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN (a kept share with no gain) equal to NaN


def test_rows_ranks_every_row_as_row_importance_does(run_dir, library, tmp_path):
    backbone, prompt, items = library
    printed, written = interpret(run_dir, tmp_path, "--rows")
    init = init_embeddings(backbone.model, read_run(run_dir)["init_ids"])
    persisted = [r.persisted for r in interpret_run(run_dir, backbone.model, backbone.tokenizer)]
    expected = row_table(row_importance(backbone, prompt, items, init, 16), persisted)
    assert same(written["row_importance"], expected)
    assert len(written["row_importance"]["rows"]) == NUM_TOKENS
    assert sorted(r["position"] for r in written["row_importance"]["rows"]) == list(range(NUM_TOKENS))
    drops = [r["mean_loglik_drop"] for r in written["row_importance"]["rows"]]
    assert drops == sorted(drops, reverse=True) and all(r["init_loglik_drop"] is not None for r in expected["rows"])
    assert written["val_examples"] == LIMIT
    table = printed[printed.index("row importance"):].splitlines()
    assert [int(line.split()[1]) for line in table[2:2 + NUM_TOKENS]] == [r["position"] for r in expected["rows"]]
    assert f"trained accuracy {expected['accuracy']:.1f}" in printed


def test_project_reports_what_the_reading_keeps(run_dir, library, tmp_path):
    backbone, prompt, items = library
    printed, written = interpret(run_dir, tmp_path, "--project")
    kept = what_reading_keeps(backbone, prompt, items, 16)
    assert written["reading"]["text"] == kept.text
    assert same(written["reading"], asdict(kept))
    assert f"trained    {kept.trained.accuracy:>9.1f}" in printed and f"none       {kept.none.accuracy:>9.1f}" in printed
    assert "row_importance" not in written and "elicitation" not in written  # only what was asked


def test_elicit_in_own_frames_over_training(run_dir, library, tmp_path):
    backbone, prompt, items = library
    frames = ("Meaning of {prompt} is", "{prompt} So the task:")
    printed, written = interpret(run_dir, tmp_path, "--elicit", "--frame", frames[0], "--frame", frames[1], "--elicit-tokens", 3)
    elicited = written["elicitation"]
    assert [d["text"] for d in elicited["final"]] == [e.text for e in elicit(backbone, prompt, frames, 3)]
    assert [d["frame"] for d in elicited["final"]] == list(frames) and elicited["max_new_tokens"] == 3
    snapshots = load_snapshots(run_dir, backbone.hidden_size)
    assert [s.epoch for s in snapshots] == [0, 1, 2]
    assert elicited["over_training"] == elicit_over_training(backbone, snapshots, frames, 3)
    assert all(0 <= d["faithfulness"]["hard_prompt_accuracy"] <= 100 for d in elicited["final"])  # the run's task scored it
    assert f"{frames[0]!r} -> {elicited['final'][0]['text']!r}" in printed


def test_elicit_defaults_to_the_documented_frames(run_dir, tmp_path):
    _, written = interpret(run_dir, tmp_path, "--elicit", "--elicit-tokens", 2)
    assert written["elicitation"]["frames"] == list(FRAMES)
    assert len(written["elicitation"]["final"]) == len(FRAMES)


@pytest.mark.parametrize(
    ("flags", "match"),
    [(["--elicit", "--frame", "What does it mean?"], "--frame: frame 'What does it mean?' has 0 {prompt} placeholders; put exactly one"),
     (["--elicit", "--frame", "Say {prompt}"], "--frame: frame 'Say {prompt}' ends at {prompt}; add the words"),
     (["--frame", "{prompt} means"], "--frame goes with --elicit")],
    ids=["no-placeholder", "nothing-after", "without-elicit"],
)
def test_bad_frames_exit_2_naming_the_flag(run_dir, flags, match):
    result = CliRunner().invoke(app, ["interpret", str(run_dir), "--device", "cpu", *flags])
    assert result.exit_code == 2
    assert match in result.output


def test_rows_of_a_prompt_without_a_task_needs_task(run_dir, tmp_path):
    bare = tmp_path / "imported"
    shutil.copytree(run_dir, bare)
    record = read_run(bare)
    del record["task"], record["config"]
    (bare / RUN_FILE).write_text(json.dumps(record))
    for flag, what in (("--rows", "row importance (--rows)"), ("--project", "the reading's accuracy (--project)")):
        result = CliRunner().invoke(app, ["interpret", str(bare), "--device", "cpu", flag])
        assert result.exit_code == 2
        assert f"{what} is scored on the prompt's task, and {bare}/run.json names none; give --task" in result.output
    _, written = interpret(bare, tmp_path, "--rows", "--task", "cb")
    assert len(written["row_importance"]["rows"]) == NUM_TOKENS
