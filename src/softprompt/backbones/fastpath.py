"""The fast path per device: the weights' dtype and the attention kernel, chosen from what the hardware computes.

A CPU with native bf16 matmul (Intel AMX, or AVX512-BF16 on Intel Cooper Lake+ and AMD Zen 4+) multiplies
bf16 matrices several times faster than fp32; one without it emulates bf16 and runs slower than fp32. So
`--dtype auto` asks the CPU (its flags), not a rule of thumb. CUDA: bf16 where the GPU has it natively.
The attention kernel per device and dtype comes from measurements (`bench/bench_fastpath.py`,
`bench/fastpath.json`); `--attention` overrides it. Prompts, optimizer state, log-probabilities and the
loss stay fp32 whatever the weights are.
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import PreTrainedModel

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of a CPU that multiplies bf16 natively
NATIVE_BF16_ENV = "SOFTPROMPT_NATIVE_BF16"  # "1" or "0" overrides the flags (a VM that hides them; the test suite)
REPORTED_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # what run.json records of a CPU
DTYPE_HELP = ("Backbone weights: auto (bf16 where the CPU (AMX, AVX512-BF16) or GPU computes it natively, training "
              "in bf16, scoring and generation in fp32; else float32), float32, bfloat16, float16 (named: everything in it).")
ATTENTION_HELP = "Attention implementation: auto (the measured fastest for the device and dtype), eager, sdpa, or another the model offers."


@dataclass(frozen=True)
class Hardware:
    """What the weights run on, as run.json, prompt headers, the score cache and `/v1/models` record it."""

    device: str  # "cpu", "cuda:0"
    model: str  # the CPU's or GPU's model name
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has (empty on a GPU)
    native_bf16: bool  # bf16 matmul in hardware (AMX / AVX512-BF16 / a CUDA GPU with bf16)

    def to_json(self) -> dict:
        return {**asdict(self), "flags": list(self.flags)}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break  # one processor is enough: every core of a machine reports the same flags
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _torch_cpu_flags() -> set[str]:
    """The bf16-relevant flags as torch's own cpuinfo sees them (where /proc/cpuinfo is missing)."""
    probes = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "avx512f": "_is_avx512_supported", "avx2": "_is_avx2_supported"}
    found = {flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}
    return found | ({"amx_bf16"} if "amx_tile" in found else set())


@cache
def cpu_hardware() -> Hardware:
    """This machine's CPU: its model name and which of the bf16-relevant flags it has.

    Raises:
        ValueError: `SOFTPROMPT_NATIVE_BF16` set to something other than 0 or 1.
    """
    info = _cpuinfo()
    flags = set(info["flags"].split()) if "flags" in info else _torch_cpu_flags()
    present = tuple(flag for flag in REPORTED_FLAGS if flag in flags)
    model = info.get("model name") or platform.processor() or platform.machine()
    native = any(flag in present for flag in NATIVE_BF16_FLAGS)
    override = os.environ.get(NATIVE_BF16_ENV)
    if override not in (None, "0", "1"):
        raise ValueError(f"{NATIVE_BF16_ENV}={override!r}: set it to 1 (native bf16) or 0 (not), or unset it to read the CPU's flags")
    return Hardware("cpu", model, present, native if override is None else override == "1")


def device_hardware(device: torch.device) -> Hardware:
    """The hardware behind `device`: the CPU's flags, or the GPU's name and bf16 support."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Hardware(f"cuda:{index}", torch.cuda.get_device_name(index), (), native)
    if device.type == "cpu":
        return cpu_hardware()
    return Hardware(str(device), str(device), (), False)  # mps and others: fp32 unless asked


def auto_dtype(hardware: Hardware) -> torch.dtype:
    """bf16 where the hardware multiplies it natively, fp32 elsewhere (fp16 is never chosen: its range overflows)."""
    return torch.bfloat16 if hardware.native_bf16 else torch.float32


def warn_if_emulated(dtype: torch.dtype, hardware: Hardware) -> None:
    """Asked for bf16 on a CPU that emulates it: it runs, but say once that it is slower than fp32.

    How much slower was not measured here (no AVX2-only CPU was at hand); the warning says so without a factor.
    """
    if dtype == torch.bfloat16 and hardware.device == "cpu" and not hardware.native_bf16:
        why = (f"{NATIVE_BF16_ENV}=0" if os.environ.get(NATIVE_BF16_ENV) == "0"
               else "no amx_bf16 or avx512_bf16 in its flags")
        warnings.warn(
            f"--dtype bfloat16 on {hardware.model}, which has no native bf16 matmul ({why}): bf16 matmul is emulated "
            f"and runs slower than float32; use --dtype auto or float32 for speed",
            stacklevel=3,
        )


# The fastest exact attention per (device type, dtype), from bench/bench_fastpath.py (bench/fastpath.json: SmolLM2,
# 2 threads, 2-core AMD EPYC Zen 4 with AVX512-BF16, 2026-12-07; training tokens/s, medians of 3 interleaved passes):
# bf16 eager 506.5 against bf16 sdpa 373.7 (torch's CPU flash-attention backward is slow in bf16); fp32 sdpa 276.1
# against eager 273.3, and scoring ties in both dtypes, so fp32 keeps transformers' default. CUDA: not measured here
# (no GPU was at hand); sdpa, transformers' default.
MEASURED_ATTENTION = {
    ("cpu", torch.float32): "sdpa",
    ("cpu", torch.bfloat16): "eager",
    ("cuda", torch.float32): "sdpa",
    ("cuda", torch.bfloat16): "sdpa",
    ("cuda", torch.float16): "sdpa",
}


def available_attention(model: PreTrainedModel) -> list[str]:
    """The attention implementations this model class accepts here (eager always; sdpa where supported)."""
    names = ["eager"]
    if getattr(model, "_supports_sdpa", False):
        names.append("sdpa")
    if getattr(model, "_supports_flash_attn", False) and torch.cuda.is_available():
        names.append("flash_attention_2")
    return names


def choose_attention(model: PreTrainedModel, device: torch.device, dtype: torch.dtype, asked: str = "auto") -> str:
    """`asked` checked against what the model offers; `auto`: the measured fastest that the model has.

    Raises:
        ValueError: `asked` names an implementation this model lacks (the message lists those it has).
    """
    offered = available_attention(model)
    if asked == "auto":
        preferred = MEASURED_ATTENTION.get((device.type, dtype), "sdpa")
        return preferred if preferred in offered else "eager"
    if asked not in offered:
        raise ValueError(
            f"--attention {asked!r}: {type(model).__name__} offers {', '.join(offered)} here; "
            f"use one of those or --attention auto"
        )
    return asked
