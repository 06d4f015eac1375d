"""The fast path's choices: dtype from the hardware's bf16 capability, attention from what the model offers."""

import pytest
import torch

from softprompt.backbones import fastpath
from softprompt.backbones.fastpath import Hardware, auto_dtype, choose_attention, cpu_hardware, warn_if_emulated

AMX = Hardware("cpu", "Intel(R) Xeon(R) Platinum 8481C", ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"), True)
ZEN4 = Hardware("cpu", "AMD EPYC 9654", ("avx512_bf16", "avx512f", "avx2"), True)
AVX2 = Hardware("cpu", "AMD EPYC 7B12", ("avx2",), False)


@pytest.mark.parametrize("hardware, expected", [(AMX, torch.bfloat16), (ZEN4, torch.bfloat16), (AVX2, torch.float32)], ids=["amx", "avx512-bf16", "avx2"])
def test_auto_dtype_follows_native_bf16(hardware, expected):
    assert auto_dtype(hardware) == expected


def test_cpu_flags_read_from_cpuinfo(monkeypatch):
    monkeypatch.delenv(fastpath.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: {"model name": "AMD EPYC 7B12", "flags": "fpu sse avx2 fma"})
    fastpath.cpu_hardware.cache_clear()
    try:
        hardware = cpu_hardware()
    finally:
        fastpath.cpu_hardware.cache_clear()
    assert hardware == AVX2


def test_cpu_flags_from_torch_where_cpuinfo_is_missing(monkeypatch):
    monkeypatch.delenv(fastpath.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: {})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    fastpath.cpu_hardware.cache_clear()
    try:
        hardware = cpu_hardware()
    finally:
        fastpath.cpu_hardware.cache_clear()
    assert hardware.native_bf16 and {"amx_bf16", "avx512_bf16"} <= set(hardware.flags)


def test_emulated_bf16_warns_naming_the_cpu():
    with pytest.warns(UserWarning, match=r"AMD EPYC 7B12, which has no native bf16 matmul"):
        warn_if_emulated(torch.bfloat16, AVX2)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("hardware, dtype", [(ZEN4, torch.bfloat16), (AVX2, torch.float32)], ids=["native", "fp32"])
def test_no_warning_where_the_choice_is_fast(hardware, dtype):
    warn_if_emulated(dtype, hardware)


def test_auto_attention_is_the_measured_choice(tiny_backbone):
    model = tiny_backbone.model
    assert choose_attention(model, torch.device("cpu"), torch.bfloat16) == "eager"
    assert choose_attention(model, torch.device("cpu"), torch.float32) == "sdpa"
    assert choose_attention(model, torch.device("cpu"), torch.float16) == "sdpa"  # unmeasured pairs: sdpa, as transformers loads


def test_unknown_attention_lists_what_the_model_offers(tiny_backbone):
    model = tiny_backbone.model
    with pytest.raises(ValueError, match=r"--attention 'flex_attention': LlamaForCausalLM offers eager, sdpa"):
        choose_attention(model, torch.device("cpu"), torch.float32, "flex_attention")


@pytest.mark.parametrize("value, native", [("1", True), ("0", False)])
def test_the_environment_overrides_the_flags(monkeypatch, value, native):
    monkeypatch.setattr(fastpath, "_cpuinfo", lambda: {"model name": "AMD EPYC 9654", "flags": "avx2 avx512f avx512_bf16"})
    monkeypatch.setenv(fastpath.NATIVE_BF16_ENV, value)
    fastpath.cpu_hardware.cache_clear()
    try:
        assert cpu_hardware().native_bf16 is native
        monkeypatch.setenv(fastpath.NATIVE_BF16_ENV, "yes")
        fastpath.cpu_hardware.cache_clear()
        with pytest.raises(ValueError, match=r"SOFTPROMPT_NATIVE_BF16='yes': set it to 1 \(native bf16\) or 0"):
            cpu_hardware()
    finally:
        fastpath.cpu_hardware.cache_clear()
