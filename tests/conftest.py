"""Shared fixtures: SmolLM2's tokenizer, tiny random models of several architectures, small data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softprompt.backbones.loading import Backbone
from factories import load_tokenizer, model_from_config

# `--dtype auto` follows the CPU (bf16 where it is native); the suite pins it to fp32 so that its numbers are the
# same on every CPU, subprocesses included. Tests of the bf16 path ask for it by name. SOFTPROMPT_NATIVE_BF16=1
# runs the whole suite with auto = bf16.
os.environ.setdefault("SOFTPROMPT_NATIVE_BF16", "0")

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "superglue"
# The full SuperGLUE release: where `make test` points SOFTPROMPT_DATA_DIR, else ../shared/data/superglue.
SHARED_DATA = Path(os.environ.get("SOFTPROMPT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue")
# `make test` (and so CI) sets this: a test skipped for want of something make test installs (Ray, the
# Gemma packages, the data folder, Chromium) then fails. Only tests marked `may_skip` (the machine
# cannot do it, e.g. root ignores read-only folders) may still skip.
REQUIRE_ALL = os.environ.get("SOFTPROMPT_REQUIRE_ALL") == "1"

# Tiny configs of four architectures; vocab 49152 so SmolLM2's tokenizer fits every one.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "bloom": dict(model_type="bloom", vocab_size=49152, hidden_size=16, n_layer=2, n_head=4),
    "gpt2": dict(model_type="gpt2", vocab_size=49152, n_embd=16, n_layer=2, n_head=4, n_positions=512,
                 bos_token_id=1, eos_token_id=2),
    "gemma": dict(model_type="gemma3_text", vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=512,
                  sliding_window=64, final_logit_softcapping=30.0),
}
ARCHITECTURES = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tokenizer():
    tok = load_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_backbone(tokenizer, request) -> Backbone:
    """A tiny random model; parametrize indirectly with an architecture name (default llama)."""
    arch = getattr(request, "param", "llama")
    return model_from_config(TINY_CONFIGS[arch], tokenizer, seed=0)


@pytest.fixture
def data_dir() -> Path:
    """A few KB of real SuperGLUE rows (shortest rows of each split, every label present)."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 16) and SmolLM2's tokenizer saved as an ordinary HF model folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model_from_config(TINY_CONFIGS["llama"], tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip: a skip that stays under SOFTPROMPT_REQUIRE_ALL=1 (the machine cannot run it)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under SOFTPROMPT_REQUIRE_ALL=1 a skip is a failure, unless the test is marked `may_skip`."""
    report = (yield).get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail") and not item.get_closest_marker("may_skip"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but make test installs what it needs (SOFTPROMPT_REQUIRE_ALL=1): {reason}"


# ---- attention implementations: the equality tests run for every one that `--attention auto` can pick ----

import contextlib  # noqa: E402
from functools import cache as _cache  # noqa: E402

from transformers import AutoConfig  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: E402

from softprompt.backbones.fastpath import MEASURED_ATTENTION, available_attention  # noqa: E402

ATTENTIONS = tuple(sorted(set(MEASURED_ATTENTION.values()) | {"eager"}))  # what auto can pick: ("eager", "sdpa")
REFERENCE_ATTENTION = "eager"  # the naive references run in the plain-matmul attention: the ground truth
_REFERENCES: dict[tuple, object] = {}  # eager references, shared by a test's attention variants


@_cache
def _offered(model_type: str) -> tuple[str, ...]:
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(model_type))]
    return tuple(a for a in ATTENTIONS if a in available_attention(model_class))


def offered_attention(config: dict) -> tuple[str, ...]:
    """The ATTENTIONS a tiny config's model class offers (bloom: eager only), read off the class: no model built."""
    return _offered(config["model_type"])


def with_attention(archs, configs: dict | None = None) -> list:
    """`(arch, attention)` params for `parametrize("tiny_backbone, attention", ..., indirect=["tiny_backbone"])`:
    every attention each architecture offers; a combination its class lacks is not generated (not skipped)."""
    return [
        pytest.param(arch, attention, id=f"{arch}-{attention}")
        for arch in archs
        for attention in offered_attention((configs or TINY_CONFIGS)[arch])
    ]


def use_attention(model, attention: str):
    """Switch `model` (in place) to `attention`; the model under test then runs in it."""
    assert attention in available_attention(model), f"{type(model).__name__} offers {available_attention(model)}"
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    return model


@contextlib.contextmanager
def attention_as(model, attention: str):
    """Run a block with `model` in `attention`, then switch it back to what it was."""
    before = model.config._attn_implementation
    model.set_attn_implementation(attention)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@pytest.fixture
def eager_reference(request):
    """`eager_reference(model, compute)`: `compute()` run with `model` in eager attention (the ground truth).

    Computed once per test and parameters other than `attention`, then shared by the test's other
    attention variants: the same seeded model and inputs give the same reference, and the naive
    references (full logits per choice) are most of these tests' time. A test's n-th call gets the
    n-th reference.
    """
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    key = (request.node.module.__name__, request.node.originalname,
           tuple(sorted((k, repr(v)) for k, v in params.items() if k != "attention")))
    calls = iter(range(1_000_000))

    def reference(model, compute):
        index = (*key, next(calls))
        if index not in _REFERENCES:
            with attention_as(model, REFERENCE_ATTENTION):
                _REFERENCES[index] = compute()
        return _REFERENCES[index]

    return reference
