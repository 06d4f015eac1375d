"""--anchor-weight through `train()` and the CLI: 0 is today's training bit for bit, a large weight holds the prompt."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import softprompt.train.loop as train_module
from conftest import FIXTURE_DATA
from softprompt.cli import app
from softprompt.io.runs import PROMPT_FILE, RUN_FILE, load_prompt
from softprompt.tasks.registry import TASKS
from softprompt.train import distributed
from softprompt.train.anchor import anchor_ids, faithfulness
from softprompt.train.loop import train
from tiny_train import tiny_config


def _prompt(folder):
    return load_prompt(folder / PROMPT_FILE)[0]


def test_weight_zero_trains_exactly_as_without_the_anchor(tiny_backbone, data_dir, tmp_path, monkeypatch):
    record = train(tiny_config(epochs=2), tmp_path / "zero", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    anchored = train(tiny_config(epochs=2, anchor_weight=0.5), tmp_path / "half", backbone=tiny_backbone, data_dir=data_dir, progress=False)

    def task_loss_only(run, items, pad_id, anchor_weight):  # the step as it was before the anchor existed
        return distributed.share_loss(train_module.loss_step, run.backbone, run.prompt, items, pad_id)

    monkeypatch.setattr(train_module, "step_loss", task_loss_only)
    before = train(tiny_config(epochs=2), tmp_path / "before", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    assert torch.equal(_prompt(tmp_path / "zero"), _prompt(tmp_path / "before"))
    assert [h["train_loss"] for h in record["history"]] == [h["train_loss"] for h in before["history"]]
    assert not torch.equal(_prompt(tmp_path / "half"), _prompt(tmp_path / "zero"))  # the penalty does reach the step
    assert anchored["history"][0]["train_loss"] != record["history"][0]["train_loss"]


def test_run_json_records_the_anchor_and_its_faithfulness(tiny_backbone, data_dir, tmp_path):
    text = "Is it true"
    record = train(tiny_config(anchor_weight=2.0, anchor_text=text), tmp_path / "run", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    ids = anchor_ids(tiny_backbone.tokenizer, text, 4)
    assert record["anchor"] == {"text": text, "weight": 2.0, "ids": ids}
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["anchor"]["ids"] == ids
    assert record["faithfulness"] == faithfulness(_prompt(tmp_path / "run"), ids, tiny_backbone.model)
    default = train(tiny_config(), tmp_path / "default", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    assert default["anchor"] == {"text": TASKS["cb"].init_text, "weight": 0.0, "ids": anchor_ids(tiny_backbone.tokenizer, TASKS["cb"].init_text, 4)}


def test_a_large_weight_keeps_the_trained_prompt_on_its_anchor(tiny_backbone, data_dir, tmp_path):
    # Adam's steps are ~lr per coordinate whatever G is, so lr must be small beside the embeddings' scale (std 0.02)
    # for the pull to hold every row on its token: at lr 0.05 even G = 1e6 leaves rows 0.1 off their anchor.
    config = dict(epochs=3, patience=3, lr=0.01)
    free = train(tiny_config(**config), tmp_path / "free", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    held = train(tiny_config(**config, anchor_weight=1e6), tmp_path / "held", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    assert held["faithfulness"] == 1.0
    assert free["faithfulness"] < 1.0
    start = _prompt(tmp_path / "held")  # text init = the default anchor, so drift from the anchor is drift from the start
    anchor = train_module.anchor_embeddings(tiny_backbone.model, tiny_backbone.tokenizer, TASKS["cb"].init_text, 4)
    assert (start - anchor).norm(dim=-1).max() < (_prompt(tmp_path / "free") - anchor).norm(dim=-1).max() / 10


@pytest.mark.parametrize(
    ("flags", "match"),
    [(["--anchor-weight", "-1"], "--anchor-weight must be a finite number >= 0 (0: no anchor), got -1.0"),
     (["--anchor-weight", "nan"], "--anchor-weight must be a finite number >= 0 (0: no anchor), got nan"),
     (["--anchor-weight", "1", "--anchor-text", "  "], "--anchor-text '  ' has no words")],
    ids=["negative", "nan", "blank-text"],
)
def test_bad_anchor_flags_exit_2_naming_the_flag(flags, match, tmp_path):
    result = CliRunner().invoke(app, ["train", "--task", "cb", "--data-dir", str(FIXTURE_DATA), *flags, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert match in result.output
    assert not (tmp_path / "run").exists()
