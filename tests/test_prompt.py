"""The soft prompt: initialisers on legible tensors, and `logits_at` against the full HF forward."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES
from naive import full_logits
from softprompt.core.prompt import (
    InitMethod,
    embed_ids,
    from_class_labels,
    from_embedded_text,
    from_sample_of_embeddings,
    random_uniform,
)
from softprompt.core.forward import logits_at
from softprompt.tasks.registry import TASKS
from softprompt.train.config import TrainConfig
from softprompt.train.loop import COMMON_TOKENS, initial_prompt


def numbered_rows(n: int, hidden: int = 3) -> torch.Tensor:
    """Row i is all i: which row a sample came from can be read off."""
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, hidden)


def row_ids(prompt: torch.Tensor) -> list[int]:
    return prompt[:, 0].long().tolist()


# ---- initialisers ----------------------------------------------------------------------------------

def test_text_init_repeats_to_length():
    prompt = from_embedded_text(numbered_rows(3), 7)
    assert torch.equal(prompt, numbered_rows(3)[[0, 1, 2, 0, 1, 2, 0]])


def test_text_init_truncates_to_length():
    prompt = from_embedded_text(numbered_rows(5), 2)
    assert torch.equal(prompt, numbered_rows(2))


def test_text_init_of_exact_length_is_a_copy():
    text = numbered_rows(4)
    prompt = from_embedded_text(text, 4)
    prompt += 100
    assert torch.equal(text, numbered_rows(4))  # the caller's embeddings are untouched


def test_text_init_without_tokens():
    with pytest.raises(ValueError, match="init text has no tokens; pass a non-empty --init-text"):
        from_embedded_text(torch.zeros(0, 3), 4)


def test_vocab_sample_rows_come_from_the_table_without_repeats():
    generator = torch.Generator().manual_seed(0)
    prompt = from_sample_of_embeddings(numbered_rows(10), 6, generator)
    ids = row_ids(prompt)
    assert prompt.shape == (6, 3)
    assert len(set(ids)) == 6 and all(0 <= i < 10 for i in ids)
    assert torch.equal(prompt, numbered_rows(10)[ids])


def test_vocab_sample_is_seeded():
    table = numbered_rows(100)
    first = from_sample_of_embeddings(table, 8, torch.Generator().manual_seed(1))
    again = from_sample_of_embeddings(table, 8, torch.Generator().manual_seed(1))
    other = from_sample_of_embeddings(table, 8, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_vocab_sample_larger_than_table_repeats_rows():
    prompt = from_sample_of_embeddings(numbered_rows(3), 8, torch.Generator().manual_seed(0))
    ids = row_ids(prompt)
    assert prompt.shape == (8, 3) and torch.equal(prompt, numbered_rows(3)[ids])  # whole table rows
    assert max(ids.count(i) for i in set(ids)) >= 3  # 8 rows from 3: some row comes back at least 3 times


def test_vocab_sample_with_repeats_draws_every_row_evenly():
    # 400 draws from 2 rows: about 200 each (binomial sd 10), not one row tiled or the rows in turn.
    ids = row_ids(from_sample_of_embeddings(numbered_rows(2), 400, torch.Generator().manual_seed(0)))
    assert 160 < ids.count(0) < 240 and ids.count(0) + ids.count(1) == 400
    assert ids[:8] != [0, 1] * 4 and len(set(ids[:8])) == 2


def test_class_label_init_puts_label_rows_first():
    labels = -1 - numbered_rows(3)  # rows -1, -2, -3: never in the vocabulary table
    prompt = from_class_labels(labels, numbered_rows(50), 7, torch.Generator().manual_seed(0))
    assert torch.equal(prompt[:3], labels)
    rest = row_ids(prompt[3:])
    assert len(set(rest)) == 4 and all(0 <= i < 50 for i in rest)


def test_class_label_init_truncates_labels():
    labels = -1 - numbered_rows(3)
    prompt = from_class_labels(labels, numbered_rows(50), 2, torch.Generator().manual_seed(0))
    assert torch.equal(prompt, labels[:2])


def test_random_init_is_uniform_in_half_unit():
    prompt = random_uniform(64, 32, torch.Generator().manual_seed(0))
    assert prompt.shape == (64, 32) and prompt.dtype == torch.float32
    assert prompt.min() >= -0.5 and prompt.max() <= 0.5
    assert prompt.min() < -0.45 and prompt.max() > 0.45  # the whole range is used, not a narrower one
    assert abs(prompt.mean()) < 0.05


def test_embed_ids_goes_through_the_embedding_module(tokenizer):
    """Gemma scales its embeddings by sqrt(hidden): reading `.weight` directly would be wrong by 4x here."""
    from conftest import TINY_CONFIGS
    from factories import model_from_config

    model = model_from_config(TINY_CONFIGS["gemma"], tokenizer).model
    ids = [5, 17, 5]
    assert torch.allclose(embed_ids(model, ids), model.get_input_embeddings().weight[ids] * 16**0.5)


# ---- initial_prompt: the config's init method on a real tokenizer -----------------------------------

def config(init: InitMethod, num_tokens: int = 6, **kwargs) -> TrainConfig:
    return TrainConfig(task="cb", init=init, num_tokens=num_tokens, **kwargs)


def test_initial_prompt_text_uses_the_task_good_prompt(tiny_backbone):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    ids = tokenizer(TASKS["cb"].init_text, add_special_tokens=False)["input_ids"]
    n = len(ids) + 3
    prompt = initial_prompt(tiny_backbone, TASKS["cb"], config(InitMethod.TEXT, n), torch.Generator())
    assert torch.equal(prompt, embed_ids(model, ids + ids[:3]))


def test_initial_prompt_custom_text(tiny_backbone):
    ids = tiny_backbone.tokenizer(" entail", add_special_tokens=False)["input_ids"]
    cfg = config(InitMethod.TEXT, 3, init_text=" entail")
    prompt = initial_prompt(tiny_backbone, TASKS["cb"], cfg, torch.Generator())
    assert torch.equal(prompt, embed_ids(tiny_backbone.model, (ids * 3)[:3]))


def test_initial_prompt_class_labels(tiny_backbone):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" True", " False", " Neither")]
    prompt = initial_prompt(tiny_backbone, TASKS["cb"], config(InitMethod.CLASS_LABELS), torch.Generator().manual_seed(0))
    assert torch.equal(prompt[:3], embed_ids(model, label_ids))
    assert rows_are_common_tokens(prompt[3:], tiny_backbone)


def test_initial_prompt_vocab_samples_common_tokens(tiny_backbone):
    prompt = initial_prompt(tiny_backbone, TASKS["cb"], config(InitMethod.VOCAB), torch.Generator().manual_seed(0))
    assert prompt.shape == (6, tiny_backbone.hidden_size)
    assert rows_are_common_tokens(prompt, tiny_backbone)


def rows_are_common_tokens(prompt: torch.Tensor, backbone) -> bool:
    table = backbone.model.get_input_embeddings().weight.detach()
    special = set(backbone.tokenizer.all_special_ids)
    for row in prompt:
        (matches,) = torch.nonzero((table == row).all(-1), as_tuple=True)
        if not any(int(i) < COMMON_TOKENS and int(i) not in special for i in matches):
            return False
    return True


def test_initial_prompt_random(tiny_backbone):
    prompt = initial_prompt(tiny_backbone, TASKS["cb"], config(InitMethod.RANDOM, 5), torch.Generator().manual_seed(0))
    assert prompt.shape == (5, tiny_backbone.hidden_size)
    # torch.rand with seed 0 starts 0.4963, 0.7682, 0.0885, 0.1320; uniform in [-0.5, 0.5] is that minus 0.5.
    torch.testing.assert_close(prompt[0, :4], torch.tensor([-0.0037, 0.2682, -0.4115, -0.3680]), atol=1e-4, rtol=0)
    # and the spread of U[-0.5, 0.5] (sd 0.5 / sqrt(3) = 0.289) over all 80 values, not a narrower range
    assert prompt.abs().max() <= 0.5 and prompt.std().item() == pytest.approx(0.289, abs=0.05)


# ---- logits_at against the full Hugging Face forward -------------------------------------------------

def right_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


@pytest.mark.parametrize("tiny_backbone", ARCHITECTURES, ids=ARCHITECTURES, indirect=True)
@pytest.mark.parametrize("prompt_kind", ["none", "shared", "per-row"])
def test_logits_at_equals_full_model_logits(tiny_backbone, prompt_kind):
    model, tokenizer, hidden = tiny_backbone.model, tiny_backbone.tokenizer, tiny_backbone.hidden_size
    input_ids, mask = right_padded(tokenizer, ["The cat sat on the mat.", "Dogs bark", "A much longer sentence, padded by none."])
    assert (mask == 0).any()  # right padding is exercised
    torch.manual_seed(0)
    prompt = {"none": None, "shared": torch.randn(3, hidden), "per-row": torch.randn(3, 3, hidden)}[prompt_kind]
    lengths = mask.sum(1)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    positions = torch.stack([torch.zeros_like(lengths), lengths - 1], 1).flatten()  # first and last real token

    got = logits_at(model, prompt, input_ids, mask, rows, positions)

    with torch.no_grad():
        full = full_logits(model, prompt, input_ids, mask)  # [B, P+T, V]
    offset = 0 if prompt is None else prompt.shape[-2]
    assert got.shape == (6, model.config.get_text_config().vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[rows, positions + offset], atol=1e-5, rtol=1e-5)
    if prompt is None:  # and the same as the plain input_ids forward
        with torch.no_grad():
            plain = model(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(got, plain[rows, positions], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiny_backbone", ARCHITECTURES, ids=ARCHITECTURES, indirect=True)
def test_padding_does_not_change_logits(tiny_backbone):
    """A row's logits are the same alone and right-padded in a batch with a longer row."""
    model, tokenizer = tiny_backbone.model, tiny_backbone.tokenizer
    prompt = torch.randn(2, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    alone_ids, alone_mask = right_padded(tokenizer, ["Dogs bark"])
    batch_ids, batch_mask = right_padded(tokenizer, ["Dogs bark", "The cat sat on the mat, and then it slept."])
    n = int(alone_mask.sum())
    positions = torch.arange(n)
    with torch.no_grad():
        alone = logits_at(model, prompt, alone_ids, alone_mask, torch.zeros(n, dtype=torch.long), positions)
        batched = logits_at(model, prompt, batch_ids, batch_mask, torch.zeros(n, dtype=torch.long), positions)
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)
