"""Bad models and mismatched prompts: each a clear error naming the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from softprompt.backbones.loading import load_backbone, tokenizer_identity
from factories import model_from_config
from softprompt.cli import app
from softprompt.io.runs import PROMPT_FILE, PromptFileError, save_prompt
from softprompt.io.sources import check_tokenizer, load_prompt_source
from softprompt.serve.bank import load_bank

from conftest import FIXTURE_DATA, TINY_CONFIGS


def word_tokenizer(words: list[str], **special) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (plus `[UNK]`), with only the special tokens given."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **special)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(folder)
    word_tokenizer(["a", "b"], pad_token="[UNK]").save_pretrained(folder)
    return folder


def test_a_tokenizer_without_pad_and_eos_is_refused(tmp_path):
    tok = word_tokenizer(["yes", "no"])
    assert tok.pad_token_id is None and tok.eos_token_id is None
    with pytest.raises(ValueError, match=r"tokenizer of random-llama has no pad token and no eos token.*\"pad_token\""):
        model_from_config({**TINY_CONFIGS["llama"], "vocab_size": 8}, tok)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_CONFIGS["llama"], "vocab_size": 8})).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"tokenizer of {folder} has no pad token and no eos token"):
        load_backbone(str(folder), "cpu")


def test_a_tokenizer_with_eos_only_pads_with_eos():
    tok = word_tokenizer(["yes", "no", "</s>"], eos_token="</s>")
    backbone = model_from_config({**TINY_CONFIGS["llama"], "vocab_size": 8}, tok)
    assert backbone.tokenizer.pad_token_id == tok.convert_tokens_to_ids("</s>")


def test_an_encoder_is_not_a_causal_lm(bert_dir):
    with pytest.raises(ValueError, match=r"is a BertForMaskedLM model, not a causal \(decoder-only\) language model"):
        load_backbone(str(bert_dir), "cpu")
    result = CliRunner().invoke(app, ["evaluate", "--task", "copa", "--no-prompt", "--model", str(bert_dir), "--data-dir", str(FIXTURE_DATA)])
    assert result.exit_code == 2 and "not a causal (decoder-only) language model" in result.output


@pytest.fixture
def other_model(tmp_path) -> Path:
    """A model folder with hidden size 16, like the tiny Llama, but a 4-token word tokenizer instead of SmolLM2's."""
    folder = tmp_path / "other-model"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_CONFIGS["llama"], "vocab_size": 8})).save_pretrained(folder)
    word_tokenizer(["True", "False", "</s>"], eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture
def smollm2_prompt(tiny_model_dir, tokenizer, tmp_path) -> Path:
    """A [2, 16] prompt whose header says it was trained under SmolLM2's tokenizer (the tiny Llama's)."""
    save_prompt(tmp_path / PROMPT_FILE, torch.ones(2, 16), {"model": str(tiny_model_dir), **tokenizer_identity(tokenizer)})
    return tmp_path / PROMPT_FILE


def assert_names_the_mismatch(message: str, tokenizer, tiny_model_dir) -> None:
    assert f"trained under a tokenizer of {len(tokenizer)} tokens" in message and "has 4" in message  # the mismatch
    assert f"--model {tiny_model_dir}" in message  # the fix


# Same hidden size (16), other tokenizer: the header's vocab size catches it, through every command that reads a prompt.


def test_a_prompt_from_another_vocabulary_is_refused_through_evaluate(tiny_model_dir, tokenizer, other_model, smollm2_prompt):
    result = CliRunner().invoke(app, ["evaluate", "--task", "copa", "--prompt", str(smollm2_prompt),
                                      "--model", str(other_model), "--data-dir", str(FIXTURE_DATA)])
    assert result.exit_code == 2, result.output
    assert_names_the_mismatch(result.output, tokenizer, tiny_model_dir)


def test_a_prompt_from_another_vocabulary_is_refused_through_generate(tiny_model_dir, tokenizer, other_model, smollm2_prompt):
    result = CliRunner().invoke(app, ["generate", "--prompt", str(smollm2_prompt), "--model", str(other_model), "--text", "True"])
    assert result.exit_code == 2, result.output
    assert_names_the_mismatch(result.output, tokenizer, tiny_model_dir)


def test_a_prompt_from_another_vocabulary_is_refused_by_serve(tiny_model_dir, tokenizer, other_model, smollm2_prompt):
    with pytest.raises(PromptFileError) as refused:
        load_bank(load_backbone(str(other_model), "cpu"), [("p", smollm2_prompt)])  # what `softprompt serve --prompt p=...` loads
    assert_names_the_mismatch(str(refused.value), tokenizer, tiny_model_dir)


def test_a_prompt_from_another_vocabulary_is_refused_as_init_from(tiny_model_dir, tokenizer, other_model, smollm2_prompt, tmp_path):
    result = CliRunner().invoke(app, ["train", "--task", "cb", "--model", str(other_model), "--init", "prompt",
                                      "--init-from", str(smollm2_prompt), "--num-tokens", "2", "--min-dev-examples", "4", "--device", "cpu",
                                      "--data-dir", str(FIXTURE_DATA), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert_names_the_mismatch(result.output, tokenizer, tiny_model_dir)
    assert not (tmp_path / "run" / PROMPT_FILE).exists()  # refused before anything was trained or saved


def test_same_size_other_tokenizer_is_refused(tmp_path):
    a, b = word_tokenizer(["yes", "no"]), word_tokenizer(["no", "yes"])  # same size, other ids
    save_prompt(tmp_path / PROMPT_FILE, torch.zeros(2, 4), {"model": "m", **tokenizer_identity(a)})
    loaded = load_prompt_source(tmp_path / PROMPT_FILE)
    with pytest.raises(PromptFileError, match=r"trained under another tokenizer .* same size 3\); use it with the model it was trained on \(--model m\)"):
        check_tokenizer(loaded, tokenizer_identity(b), "other")
    check_tokenizer(loaded, tokenizer_identity(a), "m")  # its own tokenizer passes
