"""One loader for every prompt source, tried through the CLI with an adapter that real PEFT saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from softprompt.cli import app
from softprompt.data.batch import encode
from softprompt.eval.scoring import metrics, score
from softprompt.io.peft import ADAPTER_WEIGHTS, import_peft
from softprompt.io.runs import PROMPT_FILE, RUN_FILE, PromptFileError, RunNotFinished, atomic_write_json, save_prompt
from softprompt.io.sources import SourceKind, load_prompt_source
from softprompt.backbones.loading import load_backbone
from softprompt.tasks.registry import get_task, load_examples

from conftest import FIXTURE_DATA

NUM_TOKENS = 3


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tokenizer, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """An adapter PEFT trained one step and saved with `save_pretrained`, and its prompt tensor."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_TOKENS))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([tokenizer("Paris is in France. True or False? True")["input_ids"]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(folder)
    return folder, peft_model.get_prompt_embedding_to_save("default").detach().clone()


def _evaluate(args: list[str], out: Path) -> dict:
    result = CliRunner().invoke(app, ["evaluate", "--task", "rte", "--data-dir", str(FIXTURE_DATA), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    record.pop("prompt")
    return record


def test_evaluate_reads_every_source_of_one_peft_prompt(peft_adapter, tiny_model_dir, tmp_path):
    adapter, trained = peft_adapter
    import_peft(adapter, tmp_path / "imported")
    finished = tmp_path / "finished"
    save_prompt(finished / PROMPT_FILE, trained, {"model": str(tiny_model_dir), "task": "rte"})
    atomic_write_json(finished / RUN_FILE, {"status": "done", "task": "rte", "model": str(tiny_model_dir)})
    sources = {
        "adapter folder": adapter,
        "adapter file": adapter / ADAPTER_WEIGHTS,
        "imported run": tmp_path / "imported",
        "imported prompt file": tmp_path / "imported" / PROMPT_FILE,
        "finished run": finished,
    }
    # no --model: each source names its base model (PEFT wrote the folder it was loaded from)
    results = {name: _evaluate(["--prompt", str(path)], tmp_path / f"{i}.json") for i, (name, path) in enumerate(sources.items())}

    backbone = load_backbone(str(tiny_model_dir), "cpu")
    items = [encode(backbone.tokenizer, e, 256) for e in load_examples(get_task("rte"), "val", FIXTURE_DATA)]
    expected = metrics(score(backbone, trained, items, 32))
    no_prompt = metrics(score(backbone, None, items, 32))
    for name, result in results.items():
        assert result["mode"] == "soft" and result["model"] == str(tiny_model_dir), name
        assert (result["accuracy"], result["n"]) == (expected["accuracy"], expected["n"]), name
        assert result["loss"] == pytest.approx(expected["loss"], abs=1e-6), name
    assert abs(expected["loss"] - no_prompt["loss"]) > 1e-4  # the prompt was used, not dropped


def test_each_source_reports_its_kind_and_the_same_tensor(peft_adapter, tmp_path):
    adapter, trained = peft_adapter
    import_peft(adapter, tmp_path / "run")
    kinds = {
        adapter: SourceKind.PEFT_ADAPTER,
        adapter / ADAPTER_WEIGHTS: SourceKind.ADAPTER_FILE,
        tmp_path / "run": SourceKind.IMPORTED_RUN,
        tmp_path / "run" / PROMPT_FILE: SourceKind.PROMPT_FILE,
    }
    for path, kind in kinds.items():
        loaded = load_prompt_source(path, hidden_size=16)
        assert loaded.kind is kind and torch.equal(loaded.prompt, trained), path
        assert loaded.num_tokens == NUM_TOKENS and len(loaded.sha256) == 64
    assert load_prompt_source(tmp_path / "run").run["status"] == "imported"
    assert load_prompt_source(adapter).sha256 == load_prompt_source(tmp_path / "run").sha256


def test_unfinished_run_and_stray_folders_are_refused(tmp_path):
    save_prompt(tmp_path / "run" / PROMPT_FILE, torch.randn(2, 4))
    atomic_write_json(tmp_path / "run" / RUN_FILE, {"status": "running"})
    with pytest.raises(RunNotFinished, match="status 'running'.*train --resume"):
        load_prompt_source(tmp_path / "run")
    (tmp_path / "run" / RUN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a run folder; pass .*prompt.safetensors"):
        load_prompt_source(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run.json, prompt.safetensors or adapter_config.json"):
        load_prompt_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="prompt source not found"):
        load_prompt_source(tmp_path / "nothing.safetensors")


def test_a_safetensors_file_with_neither_tensor_names_both(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(PromptFileError, match=r"no 'prompt' tensor .* or 'prompt_embeddings' tensor .*\['weight'\]"):
        load_prompt_source(tmp_path / "x.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_prompts_are_refused_from_every_source(value, tmp_path):
    prompt = torch.zeros(3, 4)
    prompt[1, 2] = value
    save_prompt(tmp_path / PROMPT_FILE, prompt)
    save_file({"prompt_embeddings": prompt}, tmp_path / ADAPTER_WEIGHTS)
    for path in (tmp_path / PROMPT_FILE, tmp_path / ADAPTER_WEIGHTS):
        with pytest.raises(PromptFileError, match=rf"{path.name}: the prompt holds NaN or inf values \(rows \[1\]\)"):
            load_prompt_source(path)


def test_non_finite_prompt_fails_evaluate(tiny_model_dir, tmp_path):
    save_prompt(tmp_path / PROMPT_FILE, torch.full((2, 16), float("nan")))
    result = CliRunner().invoke(app, ["evaluate", "--task", "copa", "--prompt", str(tmp_path / PROMPT_FILE),
                                      "--model", str(tiny_model_dir), "--data-dir", str(FIXTURE_DATA)])
    assert result.exit_code == 2 and "NaN or inf" in result.output and "Retrain" in result.output


def test_hidden_size_mismatch_names_both_sizes_for_an_adapter(peft_adapter):
    adapter, _ = peft_adapter
    with pytest.raises(PromptFileError, match="hidden size 16 .* backbone's hidden size 576"):
        load_prompt_source(adapter / ADAPTER_WEIGHTS, hidden_size=576)
