"""studies/twins.py: the first-step loss it reports is the one training computes, and a twin is judged by its interval."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import FIXTURE_DATA
from softprompt.train.loop import train
from tiny_train import tiny_config

TWINS = Path(__file__).resolve().parents[1] / "studies" / "twins.py"
spec = importlib.util.spec_from_file_location("studies_twins", TWINS)
twins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twins)


@pytest.mark.parametrize("seed", [0, 3])
def test_first_step_loss_is_the_loss_of_trainings_first_step(tmp_path, tiny_model_dir, seed):
    """One step of training logs its loss as the epoch's train loss; the scratch set-up must compute the same batch and prompt."""
    config = tiny_config(model=str(tiny_model_dir), seed=seed, epochs=1, max_steps=1)
    record = train(config, tmp_path / "run", data_dir=FIXTURE_DATA, progress=False)
    assert record["steps"] == 1
    assert twins.first_step_loss(config, FIXTURE_DATA) == pytest.approx(record["history"][0]["train_loss"], abs=0, rel=1e-6)


def test_compare_trains_the_float32_twin_once_and_judges_by_its_interval(tmp_path, tiny_model_dir):
    config = tiny_config(model=str(tiny_model_dir), epochs=1, max_steps=2)
    train(config, tmp_path / "study-run", data_dir=FIXTURE_DATA, progress=False)
    row = twins.compare(config, tmp_path / "study-run", tmp_path / "twin", FIXTURE_DATA)
    # both runs are fp32 on this tiny model: the twin is the same run, its accuracy inside its own interval
    assert row["float32_val_accuracy"] == row["val_accuracy"] and row["inside_float32_interval"]
    assert row["first_step_loss"]["auto"] == row["first_step_loss"]["float32"] and row["first_step_within_tolerance"]
    low, high = row["float32_interval"]["low"], row["float32_interval"]["high"]
    assert 0 <= low < row["val_accuracy"] < high <= 100 or row["val_accuracy"] in (0.0, 100.0)
    mtime = (tmp_path / "twin" / "prompt.safetensors").stat().st_mtime_ns
    twins.compare(config, tmp_path / "study-run", tmp_path / "twin", FIXTURE_DATA)
    assert (tmp_path / "twin" / "prompt.safetensors").stat().st_mtime_ns == mtime  # a finished twin is reused
