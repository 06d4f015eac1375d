"""dtype: bf16 weights on CPU score and train like fp32 within bf16's precision; the prompt stays fp32.

Tolerances: bf16 keeps 8 bits of mantissa (relative error ~4e-3 per rounding). On these tiny
models a choice's summed log-likelihood (-10 to -60) moves by at most 0.15 between bf16 and fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURE_DATA, TINY_CONFIGS
from tiny_train import tiny_config
from softprompt.backbones.loading import resolve_dtype
from factories import model_from_config
from softprompt.core.forward import logits_at
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.io.runs import RUN_FILE, check_resume_dtype, load_prompt
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train

SUM_LOGPROB_ATOL = 0.15


def test_auto_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_bfloat16_on_a_device_without_it_is_an_error():
    with pytest.raises(ValueError, match="--dtype bfloat16: device cuda has no bf16 support; use --dtype float16 or float32"):
        resolve_dtype("bfloat16", torch.device("cuda"), bf16_supported=False)
    assert resolve_dtype("auto", torch.device("cuda"), bf16_supported=False) == torch.float32


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown --dtype 'fp8'; use one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="--dtype 'half' is not a dtype; use one of auto, float32, bfloat16, float16"):
        TrainConfig(task="cb", dtype="half")


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_bf16_scores_match_fp32(tokenizer, arch):
    fp32 = model_from_config(TINY_CONFIGS[arch], tokenizer, seed=0)
    bf16 = model_from_config(TINY_CONFIGS[arch], tokenizer, seed=0, dtype=torch.bfloat16)
    assert bf16.dtype == "bfloat16" and fp32.dtype == "float32"
    items = [encode(tokenizer, e, 64) for e in load_examples(get_task("copa"), "val", FIXTURE_DATA)[:6]]
    prompt = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    want, got = score(fp32, prompt, items, 4).logprobs, score(bf16, prompt, items, 4).logprobs
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=SUM_LOGPROB_ATOL, rtol=0)
    assert not torch.equal(got, want)  # bf16 really ran


def test_bf16_gradient_reaches_the_fp32_prompt(tokenizer):
    bf16 = model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0, dtype=torch.bfloat16).model
    fp32 = model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0).model
    ids = torch.randint(5, 49152, (2, 6), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (fp32, bf16):
        prompt = torch.nn.Parameter(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)))
        logits = logits_at(model, prompt, ids, torch.ones_like(ids), torch.tensor([0, 1]), torch.tensor([5, 2]))
        assert logits.dtype == torch.float32
        torch.nn.functional.cross_entropy(logits, torch.tensor([7, 8])).backward()
        assert prompt.grad.dtype == torch.float32
        grads.append(prompt.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=2e-2, rtol=5e-2)


def _config(tiny_model_dir, **overrides) -> TrainConfig:
    return tiny_config(**{"model": str(tiny_model_dir), "epochs": 1, "patience": 5, "max_steps": 2, "checkpoint_every": 1, **overrides})


def test_bf16_training_records_the_dtype_and_keeps_the_prompt_fp32(tiny_model_dir, tmp_path):
    record = train(_config(tiny_model_dir, dtype="bfloat16"), tmp_path / "run", data_dir=FIXTURE_DATA, progress=False)
    assert record["dtype"] == "bfloat16" and record["config"]["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["dtype"] == "bfloat16"
    prompt, header = load_prompt(tmp_path / "run" / "prompt.safetensors")
    assert prompt.dtype == torch.float32 and header["dtype"] == "bfloat16"
    assert record["history"][0]["train_loss"] > 0


def test_resume_refuses_another_dtype(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = _config(tiny_model_dir, dtype="bfloat16", max_steps=None, epochs=2)
    train(config, out, data_dir=FIXTURE_DATA, progress=False)
    run = json.loads((out / RUN_FILE).read_text())
    run["status"] = "running"  # as a killed run leaves it
    (out / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"--dtype 'bfloat16' -> 'float32'"):
        train(_config(tiny_model_dir, dtype="float32", max_steps=None, epochs=2), out, data_dir=FIXTURE_DATA, progress=False, resume=True)
    # `auto` in both configs, but the weights differ (a CPU run resumed on a GPU): refused too
    with pytest.raises(ValueError, match="trained with bfloat16 weights, and this backbone is float32; resume with --dtype bfloat16"):
        check_resume_dtype(out, "float32")
