"""Shared fixtures: SmolLM2's tokenizer, tiny random models of several architectures, small data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softprompt.backbones.loading import Backbone, load_tokenizer, model_from_config

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
