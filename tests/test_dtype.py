"""dtype: bf16 weights on CPU score and train like fp32 within bf16's precision; the prompt stays fp32.

Tolerances: bf16 keeps 8 bits of mantissa (relative error ~4e-3 per rounding). On these tiny
models a choice's summed log-likelihood (-10 to -60) moves by at most 0.15 between bf16 and fp32.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import FIXTURE_DATA, TINY_CONFIGS
from tiny_train import tiny_config
from factories import model_from_config
from softprompt.backbones.fastpath import Hardware
from softprompt.backbones.loading import on_fast_path, resolve_dtype
from softprompt.core.forward import logits_at, prompt_keys_values
from softprompt.data.batch import encode
from softprompt.eval.scoring import score, score_mixed
from softprompt.io.runs import RUN_FILE, check_resume_dtype, load_prompt
from softprompt.tasks.registry import get_task, load_examples
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train

SUM_LOGPROB_ATOL = 0.15


AVX2 = Hardware("cpu", "AMD EPYC 7B12", ("avx2",), False)
ZEN4 = Hardware("cpu", "AMD EPYC 9654", ("avx512_bf16", "avx512f", "avx2"), True)
T4 = Hardware("cuda:0", "Tesla T4", (), False)


def test_auto_follows_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, AVX2) == torch.float32
    assert resolve_dtype("auto", cpu, ZEN4) == torch.bfloat16
    assert resolve_dtype("float32", cpu, ZEN4) == torch.float32
    with pytest.warns(UserWarning, match="no native bf16 matmul"):
        assert resolve_dtype("bfloat16", cpu, AVX2) == torch.bfloat16


def test_bfloat16_on_a_device_without_it_is_an_error():
    with pytest.raises(ValueError, match="--dtype bfloat16: Tesla T4 has no bf16 support; use --dtype float16 or float32"):
        resolve_dtype("bfloat16", torch.device("cuda"), T4)
    assert resolve_dtype("auto", torch.device("cuda"), T4) == torch.float32


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


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_auto_trains_in_bf16_and_scores_in_fp32(tokenizer, arch):
    """`--dtype auto` on a native-bf16 CPU: the training forward runs bf16 weights; every score is fp32's, bit for bit."""
    fp32 = model_from_config(TINY_CONFIGS[arch], tokenizer, seed=0)
    auto = on_fast_path(model_from_config(TINY_CONFIGS[arch], tokenizer, seed=0), torch.bfloat16)
    assert auto.dtype == "bfloat16" and auto.reference.dtype == torch.float32
    assert auto.hardware()["scores_in_float32"] and auto.scoring().dtype == "float32" and auto.scoring().reference is None
    items = [encode(tokenizer, e, 64) for e in load_examples(get_task("cb"), "val", FIXTURE_DATA)]
    prompt = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    want, got = score(fp32, prompt, items, 4), score(auto, prompt, items, 4)
    assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.exact, want.exact)
    assert not torch.equal(score(replace(auto, reference=None), prompt, items, 4).logprobs, want.logprobs)  # bf16 differs
    ids = torch.tensor([items[0].context])
    one = torch.tensor([0])
    train_logits = logits_at(auto.model, prompt, ids, torch.ones_like(ids), one, torch.tensor([ids.shape[1] - 1]))
    fp32_logits = logits_at(fp32.model, prompt, ids, torch.ones_like(ids), one, torch.tensor([ids.shape[1] - 1]))
    assert not torch.equal(train_logits, fp32_logits)  # the training forward is bf16's


def test_mixed_batches_score_in_fp32_under_auto(tokenizer):
    """The server's path: items of two prompts share forwards on the fp32 weights beside bf16 ones."""
    fp32 = model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0)
    auto = on_fast_path(model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0), torch.bfloat16)
    items = [encode(tokenizer, e, 64) for e in load_examples(get_task("cb"), "val", FIXTURE_DATA)]
    prompts = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    prompt_of = [i % 2 for i in range(len(items))]
    want = score_mixed(fp32, [prompt_keys_values(fp32.model, p) for p in prompts], prompt_of, items, 4)
    got = score_mixed(auto, [prompt_keys_values(auto.scoring().model, p) for p in prompts], prompt_of, items, 4)
    assert torch.equal(got.logprobs, want.logprobs)


def test_resume_refuses_another_attention(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model_dir, attention="eager", max_steps=None, epochs=2), out, data_dir=FIXTURE_DATA, progress=False)
    record = json.loads((out / RUN_FILE).read_text())
    assert record["hardware"]["attention"] == "eager" and record["hardware"]["dtype"] == "float32"
    assert load_prompt(out / "prompt.safetensors")[1]["attention"] == "eager"
    with pytest.raises(ValueError, match="trained with eager attention, and this backbone runs sdpa; resume with --attention eager"):
        check_resume_dtype(out, "float32", "sdpa")


def test_unknown_attention_is_refused_through_the_cli(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from softprompt.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--task", "cb", "--no-prompt", "--model", str(tiny_model_dir),
                                      "--attention", "flex_attention", "--data-dir", str(FIXTURE_DATA)])
    assert result.exit_code == 2
    assert "--attention 'flex_attention': LlamaForCausalLM offers eager, sdpa here" in result.output
