"""The README's commands through the real CLI, on a tiny model folder and the fixture rows.

The task file is the README's `examples/copa.yaml` (lm-eval's COPA over local JSON files) with its
data paths pointed at tests/fixtures/superglue: 24 train rows (12 of each label), 8 val rows (4 each).
test_cli.py covers `train --task cb`, `evaluate --prompt RUN` and the --help texts; this file the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from conftest import FIXTURE_DATA
from softprompt.cli import app
from softprompt.io.runs import PROMPT_FILE, RUN_FILE
from softprompt.tasks.registry import get_task, load_examples

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
INIT_TEXT = "Pick the more plausible alternative."


def invoke(*args) -> str:
    """The command's stdout (stderr carries progress bars)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def copa_yaml(tmp_path_factory) -> Path:
    """examples/copa.yaml and its copa.py, reading the fixture's COPA rows."""
    folder = tmp_path_factory.mktemp("task")
    shutil.copy(EXAMPLES_DIR / "copa.py", folder / "copa.py")
    text = (EXAMPLES_DIR / "copa.yaml").read_text().replace("../../shared/data/superglue", str(FIXTURE_DATA))
    (folder / "copa.yaml").write_text(text)
    return folder / "copa.yaml"


@pytest.fixture(scope="module")
def copa_run(copa_yaml, tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """`softprompt train --task FILE.yaml` with every README train flag: (run folder, output)."""
    out = tmp_path_factory.mktemp("runs") / "copa"
    output = invoke(
        "train", "--task", copa_yaml, "--model", tiny_model_dir, "--out", out, "--device", "cpu", "--num-tokens", "4",
        "--epochs", "1", "--min-dev-examples", "4", "--batch-size", "4", "--max-length", "64", "--grad-accum", "2", "--early-stop-on", "val",
        "--init", "text", "--init-text", INIT_TEXT, "--data-seed", "7", "--max-grad-norm", "1.0", "--dtype", "float32",
    )
    return out, output


def test_tasks_lists_the_built_ins_with_the_fixture_sizes(tmp_path):
    output = invoke("tasks", "--data-dir", FIXTURE_DATA, "--json", tmp_path / "tasks.json")
    lines = output.splitlines()
    assert lines[0].split() == ["task", "type", "train", "val", "majority", "choices"]
    # CB: 24 train, 6 val rows, 2 of each label: the majority class is 2/6 = 33.3%
    assert "cb       multiple_choice     24      6      33.3   True | False | Neither" in lines
    assert "copa     multiple_choice     24      8      50.0  per example" in lines
    rows = {row["task"]: row for row in json.loads((tmp_path / "tasks.json").read_text())["tasks"]}
    assert list(rows) == ["cb", "rte", "copa", "wsc", "wic", "multirc", "boolq"]
    assert rows["cb"]["splits"] == {"train": 24, "val": 6} and rows["cb"]["majority_class"] == pytest.approx(100 / 3)


def test_tasks_describes_a_task_file(copa_yaml):
    rows = [line.split() for line in invoke("tasks", copa_yaml).splitlines() if line.startswith("copa_local ")]
    assert [row[:6] for row in rows] == [["copa_local", "multiple_choice", "24", "8", "50.0", "per"]]


def test_evaluate_a_task_file_with_every_readme_flag(copa_yaml, tiny_model_dir, tmp_path):
    base = ["evaluate", "--task", copa_yaml, "--no-prompt", "--model", tiny_model_dir, "--device", "cpu"]
    invoke(*base, "--out", tmp_path / "all.json")
    invoke(*base, "--split", "train", "--limit", "5", "--batch-size", "2", "--dtype", "float32", "--out", tmp_path / "five.json")
    invoke(*base, "--split", "train", "--limit", "5", "--batch-size", "5", "--out", tmp_path / "five-b5.json")
    invoke(*base, "--split", "train", "--limit", "5", "--max-length", "8", "--out", tmp_path / "short.json")
    every, five, one_batch, short = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("all", "five", "five-b5", "short"))
    assert (every["task"], every["split"], every["mode"], every["n"]) == ("copa_local", "val", "none", 8)
    assert (five["split"], five["n"], five["dtype"]) == ("train", 5, "float32")
    # --limit is the first N: the same scores as a task file whose train split is those 5 rows alone
    rows = (FIXTURE_DATA / "COPA" / "train.jsonl").read_text().splitlines(keepends=True)[:5]
    (tmp_path / "train5.jsonl").write_text("".join(rows))
    shutil.copy(copa_yaml.parent / "copa.py", tmp_path / "copa.py")
    text = copa_yaml.read_text().replace(str(FIXTURE_DATA / "COPA" / "train.jsonl"), str(tmp_path / "train5.jsonl"))
    (tmp_path / "copa5.yaml").write_text(text)
    invoke("evaluate", "--task", tmp_path / "copa5.yaml", *base[3:], "--split", "train", "--out", tmp_path / "first5.json")
    first5 = json.loads((tmp_path / "first5.json").read_text())
    assert first5["n"] == 5 and first5["loss"] == pytest.approx(five["loss"], abs=1e-5)
    # batch size changes only how the 5 are grouped, never their scores
    assert five["loss"] == pytest.approx(one_batch["loss"], abs=1e-5) and five["accuracy"] == one_batch["accuracy"]
    # 8 tokens cut each context to its end: other inputs, another loss
    assert short["n"] == 5 and short["loss"] != pytest.approx(five["loss"], abs=1e-4)


def test_train_a_task_file_records_every_flag(copa_run, tiny_model_dir):
    out, output = copa_run
    assert sorted(p.name for p in out.iterdir()) == [PROMPT_FILE, RUN_FILE]
    record = json.loads((out / RUN_FILE).read_text())
    config = record["config"]
    assert record["status"] == "done" and record["task"] == "copa_local" and record["model"] == str(tiny_model_dir)
    assert (config["grad_accum"], config["early_stop_on"], config["init"], config["init_text"]) == (2, "val", "text", INIT_TEXT)
    assert (config["data_seed"], config["max_grad_norm"], config["dtype"], record["dtype"]) == (7, 1.0, "float32", "float32")
    # early stopping on val trains on all 24 train rows: 6 batches of 4, 2 per optimizer step = 3 steps
    assert record["steps"] == 3
    assert record["dev"]["n"] == 8 and record["val"]["n"] == 8  # val is the selection split too
    with safe_open(out / PROMPT_FILE, framework="pt") as f:
        header = f.metadata()
    assert header["init"] == "text" and header["task"] == "copa_local" and header["num_tokens"] == "4"
    assert "copa_local: best epoch 1" in output


def test_generate_continues_the_task_files_examples(copa_run, copa_yaml):
    out, _ = copa_run
    output = invoke("generate", "--prompt", out, "--task", copa_yaml, "--split", "train", "--limit", "2", "--device", "cpu")
    examples = load_examples(get_task(str(copa_yaml)), "train")[:2]
    lines = output.splitlines()
    starts = [line for line in lines if line.startswith("[")]
    assert starts == [f"[0] {examples[0].text!r}", f"[1] {examples[1].text!r}"]
    targets = [line for line in lines if line.startswith("  -> ")]
    assert len(targets) == 2
    for line, example in zip(targets, examples):
        assert line.endswith(f"(target {example.choices[example.label].strip()!r})")


def test_the_fast_path_flags_on_every_command_that_runs_the_model(copa_yaml, tiny_model_dir, tmp_path, monkeypatch):
    """`--dtype bfloat16 --attention eager` through train, evaluate, generate and interpret: each runs what it was asked."""
    monkeypatch.setenv("SOFTPROMPT_NATIVE_BF16", "1")  # as on a CPU with AMX or AVX512-BF16 (no emulation warning)
    fast = ("--dtype", "bfloat16", "--attention", "eager", "--device", "cpu")
    out = tmp_path / "run"
    invoke("train", "--task", copa_yaml, "--model", tiny_model_dir, "--out", out, "--num-tokens", "4", "--epochs", "1",
           "--min-dev-examples", "4", "--batch-size", "4", "--max-length", "64", *fast)
    record = json.loads((out / RUN_FILE).read_text())
    assert (record["hardware"]["dtype"], record["hardware"]["attention"], record["hardware"]["scores_in_float32"]) == ("bfloat16", "eager", False)
    with safe_open(out / PROMPT_FILE, framework="pt") as f:
        assert (f.metadata()["dtype"], f.metadata()["attention"]) == ("bfloat16", "eager")
    invoke("evaluate", "--task", copa_yaml, "--prompt", out, "--limit", "4", *fast, "--out", tmp_path / "eval.json")
    hardware = json.loads((tmp_path / "eval.json").read_text())["hardware"]
    assert (hardware["dtype"], hardware["attention"]) == ("bfloat16", "eager")
    assert invoke("generate", "--prompt", out, "--text", "The cat", "--max-new-tokens", "2", *fast).strip()
    invoke("interpret", out, *fast, "--json", tmp_path / "rows.json")
    read = json.loads((tmp_path / "rows.json").read_text())
    assert len(read["rows"]) == 4 and (read["hardware"]["dtype"], read["hardware"]["attention"]) == ("bfloat16", "eager")
    bad = CliRunner().invoke(app, ["evaluate", "--task", copa_yaml, "--prompt", str(out), "--attention", "flash", "--device", "cpu"])
    assert bad.exit_code == 2 and "--attention 'flash': LlamaForCausalLM offers eager, sdpa here" in bad.output
