"""--init prompt (SPoT), the Adafactor option and prompt snapshots, on a tiny model with the fixture data."""

from __future__ import annotations

import pytest
import torch

from softprompt.io.peft import export_peft
from softprompt.io.runs import CHECKPOINT_FILE, RunWriter, load_checkpoint, load_prompt
from softprompt.tasks.registry import TASKS
from softprompt.train.config import TrainConfig
from softprompt.train.loop import initial_prompt, train

TINY = dict(num_tokens=4, lr=0.3, epochs=1, min_dev_examples=6, batch_size=8, device="cpu")


def run_tiny(backbone, out, data_dir, **overrides) -> dict:
    config = TrainConfig(**{"task": "cb", **TINY, **overrides})
    return train(config, out, backbone=backbone, data_dir=data_dir, progress=False)


@pytest.fixture
def source_run(tiny_backbone, data_dir, tmp_path):
    run_tiny(tiny_backbone, tmp_path / "source", data_dir, task="rte", max_steps=1)
    return tmp_path / "source"


def test_init_from_a_run_folder_starts_from_its_prompt(tiny_backbone, data_dir, source_run, tmp_path):
    source, _ = load_prompt(source_run)
    record = run_tiny(tiny_backbone, tmp_path / "target", data_dir, init="prompt", init_from=str(source_run), snapshot_every=1)
    start, meta = load_prompt(tmp_path / "target" / "snapshots" / "epoch-0000.safetensors")
    assert torch.equal(start, source) and meta["step"] == "0"
    assert record["config"]["init"] == "prompt" and record["config"]["init_from"] == str(source_run)
    assert not torch.equal(load_prompt(tmp_path / "target")[0], source)  # and then it trained


def test_init_from_a_peft_adapter(tiny_backbone, source_run, tmp_path):
    export_peft(source_run, tmp_path / "adapter")
    config = TrainConfig(task="cb", init="prompt", init_from=str(tmp_path / "adapter"), **{k: v for k, v in TINY.items()})
    start = initial_prompt(tiny_backbone, TASKS["cb"], config, torch.Generator())
    assert torch.equal(start, load_prompt(source_run)[0])


def test_init_from_a_prompt_of_another_shape_names_both_shapes(tiny_backbone, source_run):
    config = TrainConfig(task="cb", init="prompt", init_from=str(source_run), **{**TINY, "num_tokens": 3})
    with pytest.raises(ValueError, match=r"has shape \[4, 16\], but this prompt is \[3, 16\] \(--num-tokens 3.*set --num-tokens 4"):
        initial_prompt(tiny_backbone, TASKS["cb"], config, torch.Generator())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"init": "prompt"}, r"--init-from goes with --init prompt \(got --init prompt, --init-from None\)"),
     ({"init_from": "runs/x"}, r"--init-from goes with --init prompt \(got --init text, --init-from 'runs/x'\)"),
     ({"optimizer": "sgd"}, "--optimizer must be one of adamw, adafactor, got 'sgd'"),
     ({"snapshot_every": 0}, "--snapshot-every must be at least 1, got 0")],
    ids=["prompt-without-source", "source-without-prompt", "optimizer", "snapshot-every"],
)
def test_config_errors_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="cb", **overrides)


def test_adafactor_trains_the_prompt_only(tiny_backbone, data_dir, tmp_path, monkeypatch):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    monkeypatch.setattr(RunWriter, "remove_checkpoint", lambda self: None)  # keep the last checkpoint to read its moments
    record = run_tiny(tiny_backbone, tmp_path / "adafactor", data_dir, optimizer="adafactor", init="random", epochs=2)
    assert record["status"] == "done" and record["steps"] == 6
    assert record["history"][1]["train_loss"] < record["history"][0]["train_loss"]
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.model.state_dict().items())
    # Adafactor's factored second moment of the [4, 16] prompt (a row and a column), no first moment (beta1 None)
    moments, _ = load_checkpoint(tmp_path / "adafactor" / CHECKPOINT_FILE)
    assert sorted(k for k in moments if k.startswith("optimizer.")) == [
        "optimizer.RMS", "optimizer.exp_avg_sq_col", "optimizer.exp_avg_sq_row", "optimizer.step"]
    assert moments["optimizer.exp_avg_sq_row"].shape == (4,) and moments["optimizer.exp_avg_sq_col"].shape == (16,)
    assert moments["optimizer.step"].item() == 6
    # and the optimizer named is the one that ran: AdamW from the same start ends elsewhere
    run_tiny(tiny_backbone, tmp_path / "adamw", data_dir, optimizer="adamw", init="random", epochs=2)
    assert not torch.equal(load_prompt(tmp_path / "adafactor")[0], load_prompt(tmp_path / "adamw")[0])


def test_snapshots_every_n_epochs(tiny_backbone, data_dir, tmp_path):
    run_tiny(tiny_backbone, tmp_path, data_dir, epochs=4, patience=10, snapshot_every=2)
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert names == ["epoch-0000.safetensors", "epoch-0002.safetensors", "epoch-0004.safetensors"]
    steps = [load_prompt(tmp_path / "snapshots" / n)[1]["step"] for n in names]
    assert steps == ["0", "6", "12"]  # 3 steps per epoch


def test_a_study_refuses_to_reuse_a_run_whose_source_prompt_was_retrained(tiny_backbone, data_dir, source_run, tmp_path):
    """SPoT's runs start from another run's prompt: retraining that source makes them stale, and the study says so."""
    from softprompt.io.runs import save_prompt, tensor_sha256
    from softprompt.study.grid import reusable

    config = TrainConfig(**{"task": "cb", **TINY, "init": "prompt", "init_from": str(source_run), "max_steps": 1})
    record = train(config, tmp_path / "target", backbone=tiny_backbone, data_dir=data_dir, progress=False)
    source, header = load_prompt(source_run)
    assert record["init_from_sha256"] == tensor_sha256(source)
    assert reusable(config, tmp_path / "target")
    save_prompt(source_run / "prompt.safetensors", source + 1.0, {k: v for k, v in header.items() if k not in ("sha256",)})
    with pytest.raises(ValueError, match="trained from another version of its source prompt .*delete that run folder to retrain it"):
        reusable(config, tmp_path / "target")
