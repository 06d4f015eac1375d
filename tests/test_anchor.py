"""The anchor penalty on one-hot rows, a large weight holding a trained prompt on its anchor, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.analysis.interpret import init_token_ids
from softprompt.core.prompt import embed_text
from softprompt.data.batch import encode, train_batch
from softprompt.tasks.registry import TASKS, load_examples
from softprompt.train.anchor import anchor_embeddings, anchor_ids, anchor_penalty, check_anchor, faithfulness
from softprompt.train.loop import loss_step


class OneHotModel(torch.nn.Module):
    """Just an input-embedding table whose token i is the unit vector e_i, so nearest tokens can be read off."""

    def __init__(self, size: int):
        super().__init__()
        self.embedding = torch.nn.Embedding.from_pretrained(torch.eye(size))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embedding


def test_penalty_is_weighted_mean_squared_row_distance():
    anchor = torch.eye(4)[:3]  # rows e_0, e_1, e_2
    prompt = anchor.clone()
    prompt[1] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # ||e_3 * 2 - e_1||^2 = 5; the other rows sit on their anchor
    assert anchor_penalty(prompt, anchor, 3.0).item() == pytest.approx(3.0 * 5 / 3)
    assert anchor_penalty(anchor, anchor, 100.0).item() == 0.0
    prompt.requires_grad_(True)
    anchor_penalty(prompt, anchor, 3.0).backward()
    assert torch.allclose(prompt.grad[1], 3.0 * 2 * (prompt[1] - anchor[1]).detach() / 3)  # pulls row 1 back toward e_1
    assert prompt.grad[[0, 2]].abs().sum() == 0


def test_faithfulness_reads_off_one_hot_rows():
    model = OneHotModel(5)
    prompt = torch.tensor([[0.9, 0.1, 0, 0, 0], [0, 0.2, 0.7, 0, 0], [0, 0, 0, 0, 1.0]])  # nearest: 0, 2, 4
    assert faithfulness(prompt, [0, 2, 4], model) == 1.0
    assert faithfulness(prompt, [0, 1, 3], model) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 anchor ids for a prompt of 3 rows"):
        faithfulness(prompt, [0, 1], model)


def test_anchor_repeats_the_text_as_the_text_init_does(tiny_backbone):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    text = "True or False"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    anchor = anchor_embeddings(model, tokenizer, text, len(ids) + 2)
    embedded = embed_text(model, tokenizer, text)
    assert torch.equal(anchor, torch.cat([embedded, embedded[:2]]))  # cyclic: the text again from its start
    assert anchor_ids(tokenizer, text, len(ids) + 2) == ids + ids[:2] == init_token_ids(tokenizer, text, len(ids) + 2)
    assert anchor_embeddings(model, tokenizer, text, 1).shape == (1, tiny_backbone.hidden_size)  # truncated
    assert faithfulness(anchor, anchor_ids(tokenizer, text, len(ids) + 2), model) == 1.0


def _train(backbone, anchor: torch.Tensor, weight: float, items, steps: int = 12) -> torch.Tensor:
    """Adam on the prompt alone (the backbone is frozen), task loss + anchor penalty, from the anchor."""
    prompt = anchor.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prompt], lr=0.05)
    batch = train_batch(items, backbone.tokenizer.pad_token_id)
    for _ in range(steps):
        optimizer.zero_grad()
        (loss_step(backbone, prompt, batch) + anchor_penalty(prompt, anchor, weight)).backward()
        optimizer.step()
    return prompt.detach()


def test_large_weight_keeps_the_prompt_on_its_anchor(tiny_backbone, data_dir):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    items = [encode(tokenizer, e, 256) for e in load_examples(TASKS["cb"], "val", data_dir)[:4]]
    text = "Does the hypothesis entail"
    anchor, ids = anchor_embeddings(model, tokenizer, text, 6), anchor_ids(tokenizer, text, 6)
    free = _train(tiny_backbone, anchor, 0.0, items)
    held = _train(tiny_backbone, anchor, 1e6, items)
    drift = lambda prompt: (prompt - anchor).norm(dim=-1).max().item()  # noqa: E731
    assert all(p.grad is None for p in model.parameters()) and not any(p.requires_grad for p in model.parameters())
    assert drift(free) > 10 * drift(held)
    assert faithfulness(held, ids, model) == 1.0
    assert faithfulness(free, ids, model) < 1.0


@pytest.mark.parametrize(
    ("weight", "text", "match"),
    [(-1.0, None, "--anchor-weight must be a finite number >= 0"), (math.nan, None, "--anchor-weight .* got nan"),
     (math.inf, None, "--anchor-weight .* got inf"), (0.5, "   ", "--anchor-text '   ' has no words")],
    ids=["negative", "nan", "inf", "blank-text"],
)
def test_check_anchor_names_the_flag(weight, text, match):
    with pytest.raises(ValueError, match=match):
        check_anchor(weight, text)


def test_check_anchor_accepts_zero_and_a_text():
    check_anchor(0.0, None)
    check_anchor(2.5, "Pick the correct choice")


def test_anchor_bad_input(tiny_backbone):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    with pytest.raises(ValueError, match="--anchor-text '' has no tokens"):
        anchor_embeddings(model, tokenizer, "", 4)
    with pytest.raises(ValueError, match="--anchor-text '' has no tokens"):
        anchor_ids(tokenizer, "", 4)
    with pytest.raises(ValueError, match=r"anchor has shape \[2, 16\] but the prompt is \[3, 16\]; .*--num-tokens"):
        anchor_penalty(torch.zeros(3, 16), torch.zeros(2, 16), 1.0)
