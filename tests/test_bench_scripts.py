"""The bench scripts run end to end through their command lines (a tiny model, the fixture data), and what they
write holds the equalities they exist to show: softprompt's loss is PEFT's, exact sides agree with fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURE_DATA

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.filterwarnings("ignore")
def test_bench_fastpath_writes_every_side_and_softprompts_loss_is_pefts(tmp_path, tiny_model_dir):
    out = tmp_path / "fastpath.json"
    run_bench("bench_fastpath.py", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--num-tokens", "4",
              "--train-examples", "8", "--threads", "1", "--passes", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["cpu"]["model"]
    training = result["training"]["sides"]
    assert sorted(training) == sorted([f"{side} {dtype} {attention}" for side in ("softprompt", "peft")
                                       for dtype in ("float32", "bfloat16") for attention in ("sdpa", "eager")])
    assert all(side["tokens_per_s_median"] > 0 for side in training.values())
    # the same first batch and prompt: PEFT's standard loss and ours agree in fp32 (each attention)
    for attention in ("sdpa", "eager"):
        ours, peft = training[f"softprompt float32 {attention}"], training[f"peft float32 {attention}"]
        assert ours["first_batch_loss"] == pytest.approx(peft["first_batch_loss"], rel=1e-5)
    scoring = result["scoring"]
    assert scoring["examples"] == 6  # the fixture's CB val split, whole
    assert scoring["sides"]["float32 sdpa"]["predictions_equal_fp32"] and scoring["sides"]["float32 eager"]["predictions_equal_fp32"]
    assert len(scoring["sides"]) == 5  # four (dtype, attention) sides and bf16 judged in fp32


@pytest.mark.filterwarnings("ignore")
def test_bench_parity_compares_bf16_with_fp32_per_task_and_prompt(tmp_path, tiny_model_dir):
    from softprompt.backbones.loading import load_backbone
    from softprompt.data.batch import encode
    from softprompt.eval.scoring import score
    from softprompt.tasks.registry import get_task, load_examples

    out, everything = tmp_path / "parity.json", tmp_path / "parity-bound-inf.json"
    common = ("--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--tasks", "cb", "copa", "--threads", "1")
    run_bench("bench_parity.py", *common, "--out", str(out))
    run_bench("bench_parity.py", *common, "--bound", "1e9", "--out", str(everything))
    result, judged_all = json.loads(out.read_text()), json.loads(everything.read_text())
    assert sorted(result["tasks"]) == ["cb", "copa"] and result["bound"] == 0.5
    fp32 = load_backbone(str(tiny_model_dir), "cpu", "float32")
    for task, n in (("cb", 6), ("copa", 8)):
        assert sorted(result["tasks"][task]) == ["none", "text"]
        for mode, row in result["tasks"][task].items():
            assert row["n"] == n and row["prediction_flips"] == len(row["flip_fp32_margins"]) <= n
            assert row["accuracy_fp32"] == judged_all["tasks"][task][mode]["accuracy_fp32"]  # fp32 is deterministic
            # a bound above every margin re-scores every example in fp32: the judged predictions are fp32's
            assert judged_all["tasks"][task][mode]["rescored_within_bound"] == n and judged_all["tasks"][task][mode]["judged_identical_to_fp32"]
        items = [encode(fp32.tokenizer, e, 1024) for e in load_examples(get_task(task), "val", FIXTURE_DATA)]
        scores = score(fp32, None, items, 32)
        accuracy = 100 * float((scores.predictions()[0] == scores.labels).float().mean())
        assert result["tasks"][task]["none"]["accuracy_fp32"] == pytest.approx(accuracy)  # what `score` gives in-process


@pytest.mark.filterwarnings("ignore")
def test_bench_serve_quick_serves_every_side_and_fp32_sides_agree(tmp_path, tiny_model_dir):
    out = tmp_path / "serve.json"
    done = run_bench("serve/bench_serve.py", "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA), "--dtypes", "float32",
                     "--quick", "--threads", "1", "--out", str(out))
    result = json.loads(out.read_text())
    sides = {row["side"] for row in result["results"]}
    assert {"batched", "single", "peft"} <= sides
    assert all(row["concurrency"] == 1 for row in result["results"])
    for label, found in result["agreement_with_reference"]["float32"].items():
        assert found["choices_differ"] == 0, label
    assert "chose otherwise" in done.stdout
