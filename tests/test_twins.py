"""studies/twins.py: the first-step loss it reports is the one training computes, and a twin is judged by its interval."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import FIXTURE_DATA
from softprompt.analysis.statistics import wilson_interval
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


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Reference: the 95% Wilson score interval of `successes / n`, in percent, from its textbook formula."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def set_val_accuracy(run_dir: Path, accuracy: float) -> None:
    record = json.loads((run_dir / "run.json").read_text())
    record["val"]["accuracy"] = accuracy
    (run_dir / "run.json").write_text(json.dumps(record))


@pytest.mark.filterwarnings("ignore:--dtype bfloat16 on .* no native bf16 matmul:UserWarning")  # slow, not wrong, on such CPUs
def test_compare_trains_the_float32_twin_once_and_judges_by_its_interval(tmp_path, tiny_model_dir, monkeypatch):
    # the study run in bf16 (what auto picks on a native-bf16 CPU; the suite pins auto to fp32): the twin truly differs
    config = tiny_config(model=str(tiny_model_dir), epochs=1, max_steps=1, dtype="bfloat16")
    study, twin = tmp_path / "study-run", tmp_path / "twin"
    ours = train(config, study, data_dir=FIXTURE_DATA, progress=False)
    row = twins.compare(config, study, twin, FIXTURE_DATA)
    theirs = json.loads((twin / "run.json").read_text())
    assert (ours["dtype"], theirs["dtype"], row["dtype"]) == ("bfloat16", "float32", "bfloat16")
    assert (row["val_accuracy"], row["float32_val_accuracy"]) == (ours["val"]["accuracy"], theirs["val"]["accuracy"])
    n = theirs["val"]["n"]
    assert n == row["n"] == 6  # the fixture's CB val split
    successes = round(theirs["val"]["accuracy"] * n / 100)
    assert row["float32_interval"] == dataclasses.asdict(wilson_interval(successes, n))
    low, high = wilson(successes, n)
    assert (row["float32_interval"]["low"], row["float32_interval"]["high"]) == (pytest.approx(low), pytest.approx(high))
    # one step each: the first-step losses are the ones each run logged, and bf16 moves them apart
    losses = row["first_step_loss"]
    assert losses["auto"] == pytest.approx(ours["history"][0]["train_loss"], abs=0, rel=1e-6)
    assert losses["float32"] == pytest.approx(theirs["history"][0]["train_loss"], abs=0, rel=1e-6)
    gap = abs(losses["auto"] - losses["float32"])
    assert 0 < gap <= twins.FIRST_STEP_TOLERANCE and row["first_step_within_tolerance"]

    mtime = (twin / "prompt.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(twins, "first_step_loss", lambda c, *_: losses["float32" if c.dtype == "float32" else "auto"])
    monkeypatch.setattr(twins, "FIRST_STEP_TOLERANCE", gap / 2)
    assert not twins.compare(config, study, twin, FIXTURE_DATA)["first_step_within_tolerance"]
    monkeypatch.setattr(twins, "FIRST_STEP_TOLERANCE", gap * 2)
    # the verdict reads the study run's val accuracy against the twin's interval, bounds included
    low, high = row["float32_interval"]["low"], row["float32_interval"]["high"]
    for accuracy, inside in ((low, True), (high, True), ((low + high) / 2, True), (low - 0.01, False), (high + 0.01, False)):
        set_val_accuracy(study, accuracy)
        judged = twins.compare(config, study, twin, FIXTURE_DATA)
        assert (judged["val_accuracy"], judged["inside_float32_interval"]) == (accuracy, inside), accuracy
        assert judged["float32_interval"] == row["float32_interval"] and judged["first_step_within_tolerance"]
    assert (twin / "prompt.safetensors").stat().st_mtime_ns == mtime  # a finished twin is reused


@pytest.mark.filterwarnings("ignore:--dtype bfloat16 on .* no native bf16 matmul:UserWarning")
def test_main_trains_twins_through_its_cli_loading_each_dtype_once(tmp_path, tiny_model_dir, monkeypatch, capsys):
    toml = tmp_path / "study.toml"
    toml.write_text(f'''tasks = ["cb"]\nseeds = [0, 1]\nmodel = "{tiny_model_dir}"\ndtype = "bfloat16"\nnum_tokens = 4\n'''
                    "epochs = 1\nmax_steps = 1\nbatch_size = 4\nmin_dev_examples = 4\nmax_length = 64\ndevice = \"cpu\"\n")
    from softprompt.study.config import StudyConfig

    config = StudyConfig.from_toml(toml)
    for seed in config.seeds:
        train(config.train_config("cb", seed), tmp_path / "study" / "runs" / f"cb-s{seed}", data_dir=FIXTURE_DATA, progress=False)
    loads = []
    real_load = twins.load_backbone
    monkeypatch.setattr(twins, "load_backbone", lambda *a, **k: loads.append(a[2]) or real_load(*a, **k))
    argv = ["twins.py", str(toml), str(tmp_path / "study"), "--tasks", "cb", "--out", str(tmp_path / "twins"), "--data-dir", str(FIXTURE_DATA)]
    monkeypatch.setattr("sys.argv", argv)
    status = twins.main()
    assert loads == ["bfloat16", "float32"]  # one backbone per dtype for both seeds' comparisons
    report = json.loads((tmp_path / "twins" / "twins.json").read_text())
    assert [row["run"] for row in report["runs"]] == ["cb-s0", "cb-s1"]
    for row, seed in zip(report["runs"], config.seeds):
        twin = json.loads((tmp_path / "twins" / f"cb-s{seed}-float32" / "run.json").read_text())
        assert (twin["dtype"], row["float32_val_accuracy"]) == ("float32", twin["val"]["accuracy"])
    verdicts = [row["inside_float32_interval"] and row["first_step_within_tolerance"] for row in report["runs"]]
    assert status == (0 if all(verdicts) else 1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["cb-s0", "cb-s1"] and "bfloat16 val" in lines[0]
