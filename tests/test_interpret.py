"""Nearest tokens on one-hot embeddings, persisted flags, scripts and readable tokens."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from softprompt.cli import app
from softprompt.analysis.interpret import (
    format_table,
    init_token_ids,
    interpret_run,
    nearest_tokens,
    nearest_tokens_in_model,
    read_rows,
    readable,
    script_of,
)
from softprompt.train.config import TrainConfig
from softprompt.train.loop import initial_prompt
from softprompt.io.runs import atomic_write_json, save_prompt
from softprompt.tasks.registry import get_task


def test_nearest_tokens_reads_off_one_hot_rows():
    vocab = torch.eye(5)  # token i is the unit vector e_i
    prompt = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 2.0]])
    cosines, ids = nearest_tokens(prompt, vocab, k=2)
    assert ids.tolist() == [[1, 3], [4, 2]]  # row 2: e_4 first, then a zero-cosine tie (any of 1, 2, 3)
    assert cosines[0].tolist() == pytest.approx([3 / 10**0.5, 1 / 10**0.5])
    assert cosines[1, 0].item() == pytest.approx(2 / 5**0.5)


def test_cosine_ignores_scale():
    vocab = torch.tensor([[1.0, 0.0], [10.0, 10.0]])
    _, ids = nearest_tokens(torch.tensor([[1.0, 1.1]]), vocab, k=1)
    assert ids.item() == 1  # nearest by angle, though token 0 is nearer in Euclidean distance


def test_nearest_tokens_errors():
    with pytest.raises(ValueError, match="hidden size 3 != vocabulary hidden size 5"):
        nearest_tokens(torch.zeros(2, 3), torch.eye(5))
    with pytest.raises(ValueError, match="--top-k must be between 1 and the vocabulary size 5, got 6"):
        nearest_tokens(torch.ones(2, 5), torch.eye(5), k=6)


def test_chunked_search_equals_full_search(tiny_backbone):
    model = tiny_backbone.model
    prompt = torch.randn(6, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    vocab = model.get_input_embeddings()(torch.arange(model.get_input_embeddings().num_embeddings))
    full_cos, full_ids = nearest_tokens(prompt, vocab, k=3)
    cos, ids = nearest_tokens_in_model(model, prompt, k=3, chunk_size=1000)
    assert torch.equal(ids, full_ids)
    assert torch.allclose(cos, full_cos, atol=1e-6)


def test_init_token_ids_repeat_and_truncate(tokenizer):
    ids = tokenizer("Pick the correct choice", add_special_tokens=False)["input_ids"]
    assert init_token_ids(tokenizer, "Pick the correct choice", 2) == ids[:2]
    assert init_token_ids(tokenizer, "Pick the correct choice", len(ids) + 2) == ids + ids[:2]


def test_untrained_text_init_persists_everywhere(tiny_backbone):
    """A prompt that is still its text init: every row's nearest token is its init token."""
    config = TrainConfig(task="rte", num_tokens=16)
    prompt = initial_prompt(tiny_backbone, get_task("rte"), config, torch.Generator())
    init_ids = init_token_ids(tiny_backbone.tokenizer, get_task("rte").init_text, 16)
    cos, ids = nearest_tokens_in_model(tiny_backbone.model, prompt, k=3)
    rows = read_rows(cos, ids, tiny_backbone.tokenizer, init_ids)
    assert all(row.persisted for row in rows)
    assert [row.neighbours[0].token_id for row in rows] == init_ids
    assert rows[2].init_token == "␣hypothesis"


def test_persisted_only_where_nearest_is_init(tokenizer):
    cosines = torch.tensor([[0.9, 0.5], [0.8, 0.7]])
    ids = torch.tensor([[10, 11], [12, 13]])
    rows = read_rows(cosines, ids, tokenizer, [10, 13])  # row 1's init token is only second nearest
    assert [row.persisted for row in rows] == [True, False]
    assert all(not row.persisted and row.init_token is None for row in read_rows(cosines, ids, tokenizer, None))


@pytest.mark.parametrize(
    ("text", "script"),
    [(" entail", "Latin"), ("é", "Latin"), ("صحيح", "Arabic"), ("सही", "Devanagari"), ("准确", "Han"), ("정확", "Hangul"),
     ("точно", "Cyrillic"), ("ਸਹੀ", "Gurmukhi"), ("ಸರಿ", "Kannada"), ("ελ", "Greek"), ("123", "Common"), (",\n", "Common"),
     ("\ufffd", "Bytes")],
    ids=["latin", "accent", "arabic", "devanagari", "han", "hangul", "cyrillic", "gurmukhi", "kannada", "greek", "digits",
         "punct", "partial-utf8"],
)
def test_script_of(text, script):
    assert script_of(text) == script


def test_readable_marks_spaces_and_escapes_control_characters():
    assert readable(" entail") == "␣entail"
    assert readable(",\n") == ",\\n"
    assert readable("a\tb\x01") == "a\\tb\\x01"
    assert readable("") == "∅"


@pytest.fixture
def run_dir(tmp_path, tiny_backbone):
    """A run folder holding an untrained text-init prompt (with the tiny model saved as its backbone)."""
    model_dir = tmp_path / "model"
    tiny_backbone.model.save_pretrained(model_dir)
    tiny_backbone.tokenizer.save_pretrained(model_dir)
    config = TrainConfig(task="cb", model=str(model_dir), num_tokens=5)
    prompt = initial_prompt(tiny_backbone, get_task("cb"), config, torch.Generator())
    run = tmp_path / "run"
    save_prompt(run / "prompt.safetensors", prompt, {"model": str(model_dir)})
    atomic_write_json(run / "run.json", {"status": "done", "task": "cb", "model": str(model_dir), "config": config.to_json()})
    return run


def test_interpret_run_and_table(run_dir, tiny_backbone):
    rows = interpret_run(run_dir, tiny_backbone.model, tiny_backbone.tokenizer, k=2)
    assert len(rows) == 5 and all(row.persisted for row in rows)
    table = format_table(rows)
    assert "(5/5 rows)" in table and "␣hypothesis" in table  # rows: Does ␣the ␣hypothesis ␣entail ,


def test_interpret_command(run_dir, tmp_path):
    out = tmp_path / "nearest.json"
    result = CliRunner().invoke(app, ["interpret", str(run_dir), "--top-k", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "Does" in result.output and "persisted" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and len(rows[0]["neighbours"]) == 2 and rows[0]["persisted"]
