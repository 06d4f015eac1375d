"""The command line: --help derived from TrainConfig, exit codes, and train -> evaluate on a tiny model folder."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_CONFIGS
from factories import model_from_config
from naive import naive_logprobs
from softprompt.cli import app
from softprompt.data.batch import encode
from softprompt.backbones.loading import load_backbone
from softprompt.io.runs import PROMPT_FILE, RUN_FILE, load_prompt
from softprompt.tasks.registry import TASKS, get_task, load_examples
from softprompt.train.config import TrainConfig, config_from_run
from softprompt.train.loop import initial_prompt

TINY_TRAIN = ["--num-tokens", "4", "--epochs", "1", "--min-dev-examples", "6", "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """`softprompt train` on the tiny model folder and the fixture data: (result, run folder)."""
    from conftest import FIXTURE_DATA

    out = tmp_path_factory.mktemp("runs") / "cb-s0"
    result = invoke("train", "--task", "cb", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, *TINY_TRAIN, "--out", out)
    return result, out


def test_train_help_lists_every_config_field():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
    assert "--out" in result.output and "--data-dir" in result.output
    assert "[default: 0.03]" in result.output  # defaults come from the dataclass
    assert "text|class-labels|vocab|random" in result.output  # enum choices too


def test_evaluate_help():
    result = invoke("evaluate", "--help")
    assert result.exit_code == 0
    for flag in ("--prompt", "--no-prompt", "--text-prompt", "--model", "--data-dir", "--out"):
        assert flag in result.output


def test_train_with_unknown_task_exits_with_the_valid_names(tmp_path):
    result = invoke("train", "--task", "record", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "unknown task 'record'; choose one of: cb, rte, copa, wsc, wic, multirc, boolq" in result.output
    assert not (tmp_path / "run").exists()


def test_train_with_a_bad_flag_value_names_the_flag(tmp_path):
    result = invoke("train", "--task", "cb", "--num-tokens", "0", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "--num-tokens must be at least 1, got 0" in result.output


def test_train_rejects_an_unknown_init():
    result = invoke("train", "--task", "cb", "--init", "words", "--out", "x")
    assert result.exit_code == 2
    assert "'words' is not one of 'text', 'class-labels', 'vocab', 'random'" in result.output


@pytest.mark.parametrize(
    "modes", [[], ["--no-prompt", "--text-prompt"], ["--prompt", "runs/x", "--no-prompt"]], ids=["none", "two-flags", "prompt-and-flag"]
)
def test_evaluate_needs_exactly_one_prompt_mode(modes):
    result = invoke("evaluate", "--task", "cb", *modes)
    assert result.exit_code == 2
    assert "give exactly one of --prompt RUN_DIR, --no-prompt, --text-prompt" in result.output


def test_evaluate_unknown_task(tiny_model_dir):
    result = invoke("evaluate", "--task", "record", "--no-prompt", "--model", tiny_model_dir)
    assert result.exit_code == 2
    assert "choose one of: cb, rte, copa, wsc, wic, multirc, boolq, or give the path of a task file" in result.output


def test_evaluate_without_data_says_where_it_looked(tiny_model_dir, tmp_path):
    result = invoke("evaluate", "--task", "cb", "--no-prompt", "--model", tiny_model_dir, "--device", "cpu",
                    "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "SuperGLUE data folder not found (looked in:" in result.output and "nowhere" in result.output


def test_train_writes_the_run_folder(trained_run, tiny_model_dir):
    result, out = trained_run
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [PROMPT_FILE, RUN_FILE]
    record = json.loads((out / RUN_FILE).read_text())
    assert record["status"] == "done" and record["model"] == str(tiny_model_dir)
    assert record["config"]["num_tokens"] == 4 and record["config"]["device"] == "cpu"
    assert f"cb: best epoch 1, dev accuracy {record['dev']['accuracy']:.1f}" in result.output


def test_evaluate_the_trained_prompt_writes_json(trained_run, tmp_path):
    from conftest import FIXTURE_DATA

    _, run = trained_run
    out = tmp_path / "metrics.json"
    result = invoke("evaluate", "--task", "cb", "--prompt", run, "--data-dir", FIXTURE_DATA, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    record = json.loads((run / RUN_FILE).read_text())
    assert metrics["mode"] == "soft" and metrics["task"] == "cb" and metrics["split"] == "val"
    assert metrics["model"] == record["model"]  # the prompt's model, read from the prompt file
    assert metrics["n"] == 6
    # the same prompt on the same split gives the numbers training recorded
    for key in ("accuracy", "exact_match", "macro_f1", "loss"):
        assert metrics[key] == pytest.approx(record["val"][key], abs=1e-4), key
    assert "task   mode  split" in result.output


@pytest.mark.parametrize(("flag", "mode"), [("--no-prompt", "none"), ("--text-prompt", "text")])
def test_evaluate_without_a_soft_prompt(flag, mode, tiny_model_dir, tmp_path):
    from conftest import FIXTURE_DATA

    out = tmp_path / "m.json"
    result = invoke("evaluate", "--task", "rte", flag, "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA,
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["mode"] == mode and metrics["n"] == 8 and "prompt" not in metrics
    # the loss is the naive one of that prompt: RTE's text prompt as token embeddings before each example, or nothing
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager"), AutoTokenizer.from_pretrained(tiny_model_dir)
    task = get_task("rte")
    items = [encode(tokenizer, e, 256) for e in load_examples(task, "val", FIXTURE_DATA)]
    with torch.no_grad():
        text = model.get_input_embeddings()(torch.tensor(tokenizer(task.init_text, add_special_tokens=False)["input_ids"]))
    losses = {m: naive_loss(model, prompt, items) for m, prompt in (("none", None), ("text", text))}
    assert metrics["loss"] == pytest.approx(losses[mode], abs=1e-5)  # fp32: 2e-7 apart
    # on this random model the text prompt moves the loss by 6e-4: far more than the tolerance, so the modes are told apart
    assert abs(losses["text"] - losses["none"]) > 1e-4


def naive_loss(model, prompt, items) -> float:
    """Mean cross-entropy per right-answer token, from one plain forward per choice (tests/naive.py)."""
    logprobs = naive_logprobs(model, prompt, items)  # [E, C]
    right = sum(float(logprobs[e, item.label]) for e, item in enumerate(items))
    return -right / sum(len(item.choices[item.label]) for item in items)


@pytest.fixture(scope="module")
def wide_gpt2_dir(tokenizer, tmp_path_factory):
    """A tiny GPT-2 with hidden 32 (not the Llama folder's 16)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2-32"
    model_from_config({**TINY_CONFIGS["gpt2"], "n_embd": 32}, tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_a_prompt_on_the_wrong_model_names_both_sizes(trained_run, wide_gpt2_dir):
    _, run = trained_run
    result = invoke("evaluate", "--task", "cb", "--prompt", run, "--model", wide_gpt2_dir, "--device", "cpu")
    assert result.exit_code == 2
    assert "prompt hidden size 16" in result.output and "backbone's hidden size 32" in result.output


def test_train_divergence_exits_3_and_records_it(wide_gpt2_dir, tmp_path):
    from conftest import FIXTURE_DATA

    out = tmp_path / "run"
    result = invoke("train", "--task", "cb", "--model", wide_gpt2_dir, "--data-dir", FIXTURE_DATA, *TINY_TRAIN,
                    "--lr", "1e30", "--epochs", "2", "--out", out)
    assert result.exit_code == 3
    assert "training stopped: loss is nan" in result.output
    assert json.loads((out / RUN_FILE).read_text())["status"] == "diverged"
    # the last good prompt is the init (no epoch finished): the one `initial_prompt` makes for this run's config
    config = config_from_run(out)
    backbone = load_backbone(str(wide_gpt2_dir), device="cpu")
    init = initial_prompt(backbone, TASKS["cb"], config, torch.Generator().manual_seed(config.seed))
    prompt, _ = load_prompt(out)
    assert torch.isfinite(prompt).all() and torch.equal(prompt, init)


def test_train_spot_flags_end_to_end(trained_run, tiny_model_dir, tmp_path):
    """The README's SPoT command: --init prompt --init-from RUN, --optimizer adafactor, --snapshot-every,
    --max-dev-examples and --max-val-examples reach the run, and epoch 0's snapshot is the source prompt."""
    from conftest import FIXTURE_DATA

    _, source = trained_run
    out = tmp_path / "rte-from-cb"
    result = invoke("train", "--task", "rte", "--model", tiny_model_dir, "--data-dir", FIXTURE_DATA, *TINY_TRAIN,
                    "--init", "prompt", "--init-from", source, "--optimizer", "adafactor", "--lr", "0.3", "--snapshot-every", "1",
                    "--max-dev-examples", "4", "--max-val-examples", "5", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / RUN_FILE).read_text())
    assert {k: record["config"][k] for k in ("init", "init_from", "optimizer", "snapshot_every")} == {
        "init": "prompt", "init_from": str(source), "optimizer": "adafactor", "snapshot_every": 1}
    assert (record["data"]["dev"], record["data"]["val"]) == (4, 5)
    start, _ = load_prompt(out / "snapshots" / "epoch-0000.safetensors")
    assert start.equal(load_prompt(source)[0])
    assert not load_prompt(out)[0].equal(start)  # it trained
