"""softprompt <-> PEFT: the same prompt tensor gives the same logits in both, through their files."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from softprompt.data.batch import encode
from softprompt.cli import app
from softprompt.io.peft import ADAPTER_CONFIG, ADAPTER_KEY, ADAPTER_WEIGHTS, SOFTPROMPT_MODEL_FIELD, export_peft, import_peft
from softprompt.core.forward import logits_at
from softprompt.io.runs import PROMPT_FILE, PromptFileError, load_prompt, save_prompt
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import get_task, load_examples

NUM_TOKENS = 4
# PEFT warns about every adapter_config.json key it does not know ("Unexpected keyword arguments
# ['softprompt_model'] ... upgrade PEFT"): our adapters must load without a word.
pytestmark = pytest.mark.filterwarnings("error:Unexpected keyword arguments")


def weights_header(adapter_dir) -> dict[str, str]:
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as f:
        return f.metadata()


def _rows(backbone, data_dir, n: int = 3) -> list[list[int]]:
    """Unpadded token rows (context + first choice): PEFT puts its prompt before any left padding."""
    items = [encode(backbone.tokenizer, e, 64) for e in load_examples(get_task("rte"), "val", data_dir)[:n]]
    return [item.context + item.choices[0] for item in items]


def _assert_same_logits(backbone, peft_model, prompt, rows) -> None:
    for ids in rows:
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            theirs = peft_model(input_ids=input_ids).logits[0, NUM_TOKENS:]  # PEFT's logits include the prompt rows
            positions = torch.arange(len(ids))
            ours = logits_at(backbone.model, prompt, input_ids, torch.ones_like(input_ids), torch.zeros_like(positions), positions)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_exported_prompt_loads_in_peft(tiny_backbone, data_dir, tmp_path):
    prompt = torch.randn(NUM_TOKENS, tiny_backbone.hidden_size)
    save_prompt(tmp_path / "run" / PROMPT_FILE, prompt, {"model": "random-llama", "task": "rte", "init": "text"})
    config = export_peft(tmp_path / "run", tmp_path / "adapter")

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    weights = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert list(weights) == [ADAPTER_KEY] and torch.equal(weights[ADAPTER_KEY], prompt)
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_transformer_submodules"]) == (NUM_TOKENS, 16, 1)
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == get_task("rte").init_text
    assert SOFTPROMPT_MODEL_FIELD not in config  # softprompt's own field is in the weights' header
    assert weights_header(tmp_path / "adapter") == {"format": "pt", SOFTPROMPT_MODEL_FIELD: "random-llama"}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny_backbone.model, tmp_path / "adapter")
    assert [str(w.message) for w in caught if f"{os.sep}peft{os.sep}" in w.filename] == []  # not a word from PEFT
    _assert_same_logits(tiny_backbone, peft_model, prompt, _rows(tiny_backbone, data_dir))


def test_prompt_trained_by_peft_imports(tiny_backbone, data_dir, tmp_path):
    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_TOKENS)
    peft_model = get_peft_model(tiny_backbone.model, peft_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor(_rows(tiny_backbone, data_dir, 1))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peft_model.save_pretrained(tmp_path / "adapter")
    trained = peft_model.get_prompt_embedding_to_save("default").detach()

    import_peft(tmp_path / "adapter", tmp_path / "run")
    prompt, metadata = load_prompt(tmp_path / "run")
    assert torch.equal(prompt, trained) and metadata["source"] == "peft"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "imported"
    direct = load_prompt_source(tmp_path / "adapter", hidden_size=16).prompt  # evaluate --prompt ADAPTER_DIR
    assert torch.equal(direct, trained)
    peft_model.eval()
    _assert_same_logits(tiny_backbone, peft_model, prompt, _rows(tiny_backbone, data_dir))


def test_cli_round_trip(tmp_path):
    prompt = torch.randn(NUM_TOKENS, 8)
    save_prompt(tmp_path / "run" / PROMPT_FILE, prompt, {"model": "m", "init": "random"})
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", str(tmp_path / "run"), str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["import-peft", str(tmp_path / "adapter"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_prompt(tmp_path / "back")[0], prompt)


def test_import_refuses_other_adapters(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(PromptFileError, match="PROMPT_TUNING adapters only"):
        import_peft(tmp_path / "lora", tmp_path / "run")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    (tmp_path / "old" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PromptFileError, match="refusing pickle"):
        load_prompt_source(tmp_path / "old")


def test_adapter_for_another_model_is_refused(tmp_path):
    save_prompt(tmp_path / "run" / PROMPT_FILE, torch.randn(NUM_TOKENS, 8), {"model": "m"})
    export_peft(tmp_path / "run", tmp_path / "adapter")
    with pytest.raises(PromptFileError, match=r"hidden size 8 \(trained on m\) does not match the backbone.s hidden size 16"):
        load_prompt_source(tmp_path / "adapter", hidden_size=16)


def test_export_names_the_hub_model_and_keeps_the_preset_name(tmp_path):
    save_prompt(tmp_path / "run" / PROMPT_FILE, torch.randn(NUM_TOKENS, 576), {"model": "smollm2-135m-instruct", "init": "text", "task": "copa"})
    config = export_peft(tmp_path / "run", tmp_path / "adapter")
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["tokenizer_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # PEFT's TEXT init loads it
    assert SOFTPROMPT_MODEL_FIELD not in config and weights_header(tmp_path / "adapter")[SOFTPROMPT_MODEL_FIELD] == "smollm2-135m-instruct"
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text()) == config
    loaded = load_prompt_source(tmp_path / "adapter")
    assert loaded.model == "smollm2-135m-instruct"  # evaluate --prompt ADAPTER picks the preset, not the hub id
    assert PromptTuningConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_adapter_exported_with_the_model_in_its_config_still_reads(tmp_path):
    """Exports before the header kept softprompt_model in adapter_config.json (and no header field)."""
    save_prompt(tmp_path / "run" / PROMPT_FILE, torch.randn(NUM_TOKENS, 576), {"model": "smollm2-135m-instruct"})
    config = export_peft(tmp_path / "run", tmp_path / "adapter")
    prompt = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)[ADAPTER_KEY]
    save_file({ADAPTER_KEY: prompt}, tmp_path / "adapter" / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, SOFTPROMPT_MODEL_FIELD: "smollm2-135m-instruct"}))
    loaded = load_prompt_source(tmp_path / "adapter")
    assert loaded.model == "smollm2-135m-instruct" and torch.equal(loaded.prompt, prompt)
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['softprompt_model'\]"):
        PromptTuningConfig.from_pretrained(tmp_path / "adapter")  # what the old layout cost: PEFT's warning
