"""The study's score cache is keyed by the backbone's weights, dtype and library versions, not its name."""

from __future__ import annotations

import dataclasses

import torch

from factories import model_from_config
from softprompt.data.batch import encode
from softprompt.study.score_cache import cached_scores, score_cache_model_key
from softprompt.tasks.registry import get_task, load_examples

from conftest import FIXTURE_DATA, TINY_CONFIGS


def _scored(out_dir, backbone, items) -> list[str]:
    """The names `cached_scores` had to score (not found in the cache)."""
    lines = []
    cached_scores(out_dir, backbone, {"none": None, "soft": torch.ones(2, 16)}, "copa", items, 8, lines.append)
    return lines


def test_other_weights_or_dtype_under_the_same_name_miss_the_cache(tokenizer, tmp_path):
    backbone = model_from_config(TINY_CONFIGS["llama"], tokenizer)
    items = [encode(tokenizer, e, 64) for e in load_examples(get_task("copa"), "val", FIXTURE_DATA)[:4]]
    assert len(_scored(tmp_path, backbone, items)) == 2  # the no-prompt source and the soft prompt
    assert _scored(tmp_path, backbone, items) == []  # unchanged: both from the cache

    other = model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=1)  # same name, other weights
    assert other.name == backbone.name
    assert len(_scored(tmp_path, other, items)) == 2

    changed = model_from_config(TINY_CONFIGS["llama"], tokenizer)
    with torch.no_grad():
        changed.model.model.norm.weight[0] += 1e-3  # one value of one tensor
    assert score_cache_model_key(changed)["weights"] != score_cache_model_key(backbone)["weights"]

    bf16 = dataclasses.replace(backbone, model=model_from_config(TINY_CONFIGS["llama"], tokenizer).model.to(torch.bfloat16))
    key, key16 = score_cache_model_key(backbone), score_cache_model_key(bf16)
    assert (key["dtype"], key16["dtype"]) == ("torch.float32", "torch.bfloat16") and key16["weights"] != key["weights"]
    assert set(key["versions"]) == {"torch", "transformers", "softprompt"} and key["versions"]["torch"] == torch.__version__


def test_cached_scores_are_the_scored_ones_bit_for_bit(tokenizer, tmp_path):
    """A cache that rounded log-probabilities flipped a near-tied RTE prediction between a study and its resumed run."""
    backbone = model_from_config(TINY_CONFIGS["llama"], tokenizer)
    items = [encode(tokenizer, e, 64) for e in load_examples(get_task("copa"), "val", FIXTURE_DATA)[:4]]
    prompt = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    fresh = cached_scores(tmp_path, backbone, {"soft": prompt}, "copa", items, 8, lambda _: None)["soft"]
    again = cached_scores(tmp_path, backbone, {"soft": prompt}, "copa", items, 8, lambda _: None)["soft"]
    assert fresh.logprobs.dtype == again.logprobs.dtype
    assert torch.equal(fresh.logprobs, again.logprobs) and torch.equal(fresh.exact, again.exact)
