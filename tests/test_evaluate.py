"""Scoring against naive references written here: full forwards per choice, and real greedy decoding."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ARCHITECTURES, use_attention, with_attention
from softprompt.data.batch import Encoded, encode, train_batch
from softprompt.eval.scoring import Scores, metrics, score, target_logprobs
from softprompt.tasks.registry import TASKS, load_examples
from softprompt.train.loop import loss_step


def full_logits(model, prompt: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """One unbatched, unpadded forward over every position: `[T, V]` (positions of `ids` only)."""
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    if prompt is not None:
        embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits[0].float()
    return logits[0 if prompt is None else prompt.shape[0] :]


def naive_logprob(model, prompt: torch.Tensor | None, context: list[int], choice: list[int]) -> float:
    logprobs = torch.log_softmax(full_logits(model, prompt, context + choice), -1)
    return sum(float(logprobs[len(context) - 1 + j, token]) for j, token in enumerate(choice))


def greedy_reproduces(model, prompt: torch.Tensor | None, context: list[int], answer: list[int]) -> bool:
    """Decode len(answer) tokens greedily, one forward per token, and compare."""
    generated = list(context)
    for _ in answer:
        generated.append(int(full_logits(model, prompt, generated)[-1].argmax()))
    return generated[len(context) :] == answer


def encoded(tokenizer, task: str, split: str, data_dir, n: int) -> list[Encoded]:
    return [encode(tokenizer, e, 256) for e in load_examples(TASKS[task], split, data_dir)[:n]]


@pytest.mark.parametrize("tiny_backbone, attention", with_attention(ARCHITECTURES), indirect=["tiny_backbone"])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
def test_score_equals_naive_log_likelihood(tiny_backbone, attention, with_prompt, data_dir, eager_reference):
    """In every attention implementation auto can pick, against naive forwards in eager attention."""
    tokenizer, model = tiny_backbone.tokenizer, use_attention(tiny_backbone.model, attention)
    # COPA: multi-token choices of different lengths; CB: three single-token choices sharing one row
    items = encoded(tokenizer, "copa", "val", data_dir, 3) + encoded(tokenizer, "cb", "val", data_dir, 2)
    prompt = torch.randn(4, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0)) if with_prompt else None

    scores = score(tiny_backbone, prompt, items, batch_size=3)
    naive = eager_reference(model, lambda: [[naive_logprob(model, prompt, i.context, choice) for choice in i.choices] for i in items])

    assert scores.logprobs.shape == (1, len(items), 3)
    for e, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            expected = naive[e][c]
            assert scores.logprobs[0, e, c].item() == pytest.approx(expected, abs=1e-4), (e, c)
        assert all(scores.logprobs[0, e, len(item.choices) :] == float("-inf"))  # COPA has no third choice
    assert scores.labels.tolist() == [item.label for item in items]
    assert scores.answer_tokens.tolist() == [len(item.choices[item.label]) for item in items]


@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
def test_exact_match_equals_greedy_decoding(tiny_backbone, with_prompt):
    """Answers built from the model's own greedy continuation (exact) and one-token edits of it (not exact)."""
    model = tiny_backbone.model
    prompt = torch.randn(3, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(1)) if with_prompt else None
    items = []
    for context in ([28120, 17, 905], [504, 3200, 12, 44, 9], [77]):
        greedy = []
        for _ in range(3):
            greedy.append(int(full_logits(model, prompt, context + greedy)[-1].argmax()))
        other = (greedy[0] + 1) % 49152
        items += [
            Encoded(context, ([other, 5], greedy), 1),  # exact: all three tokens are the argmax
            Encoded(context, (greedy, greedy[:2] + [(greedy[2] + 1) % 49152]), 1),  # last token wrong
            Encoded(context, ([other] + greedy[1:], greedy), 0),  # first token wrong
            Encoded(context, (greedy[:1],), 0),  # single token, right
        ]

    scores = score(tiny_backbone, prompt, items, batch_size=5)

    expected = [greedy_reproduces(model, prompt, item.context, item.choices[item.label]) for item in items]
    assert expected == [True, False, False, True] * 3  # the reference itself tells the cases apart
    assert scores.exact[0].tolist() == expected


def test_k_prompts_at_once_equal_k_separate_calls(tiny_backbone, data_dir):
    items = encoded(tiny_backbone.tokenizer, "copa", "val", data_dir, 5) + encoded(tiny_backbone.tokenizer, "cb", "val", data_dir, 4)
    prompts = torch.randn(3, 4, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(2))  # [K, P, H]

    together = score(tiny_backbone, prompts, items, batch_size=4)

    assert together.logprobs.shape == (3, len(items), 3) and together.exact.shape == (3, len(items))
    for k in range(3):
        alone = score(tiny_backbone, prompts[k], items, batch_size=4)
        torch.testing.assert_close(together.logprobs[k], alone.logprobs[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(together.exact[k], alone.exact[0])
    assert not torch.allclose(together.logprobs[0], together.logprobs[1])  # the prompts do matter


def test_batch_size_does_not_change_scores(tiny_backbone, data_dir):
    items = encoded(tiny_backbone.tokenizer, "wsc", "val", data_dir, 8)
    prompt = torch.randn(2, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(3))
    one = score(tiny_backbone, prompt, items, batch_size=1)
    many = score(tiny_backbone, prompt, items, batch_size=16)
    torch.testing.assert_close(one.logprobs, many.logprobs, atol=1e-5, rtol=1e-5)


def test_dev_loss_is_the_training_loss(tiny_backbone, data_dir):
    """Per-answer-token cross-entropy: scoring and the training step agree on the same examples."""
    items = encoded(tiny_backbone.tokenizer, "copa", "train", data_dir, 6)
    prompt = torch.randn(3, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        train_loss = loss_step(tiny_backbone, prompt, train_batch(items, tiny_backbone.tokenizer.pad_token_id))
    assert score(tiny_backbone, prompt, items).dev_loss().item() == pytest.approx(train_loss.item(), abs=1e-5)


def test_metrics_on_known_scores():
    # 4 examples, 3 choices; predictions (argmax) are 0, 1, 1, 2; labels 0, 1, 2, 2
    logprobs = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.3, 0.1, 0.6]]]))
    scores = Scores(logprobs, torch.tensor([[True, False, False, True]]), torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 1, 1]))
    result = metrics(scores)
    assert result["accuracy"] == 75.0
    assert result["exact_match"] == 50.0
    # per-class F1: class 0 = 1, class 1 = 2/3 (P 1/2, R 1), class 2 = 2/3 (P 1, R 1/2)
    assert result["macro_f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)
    assert result["loss"] == pytest.approx(-(math.log(0.6) + math.log(0.7) + math.log(0.4) + math.log(0.6)) / 5)
    assert result["n"] == 4


def test_metrics_pick_the_prompt():
    logprobs = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]]))  # [K=2, E=2, C=2]
    scores = Scores(logprobs, torch.tensor([[True, True], [False, False]]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert metrics(scores, 0)["accuracy"] == 100.0 and metrics(scores, 1)["accuracy"] == 0.0
    assert metrics(scores, 1)["exact_match"] == 0.0


def test_target_logprobs_by_hand_and_against_log_softmax():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [5.0, 5.0, 1.0], [1e4, 0.0, -1e4]])
    logprobs, greedy = target_logprobs(logits, torch.tensor([2, 1, 1]), block=2)
    torch.testing.assert_close(logprobs, torch.tensor([math.log(0.5), math.log(math.exp(5) / (2 * math.exp(5) + math.exp(1))), -1e4]))
    assert greedy.tolist() == [True, False, False]  # row 1: a tie between 0 and 1 goes to the first
    big = torch.randn(37, 500, generator=torch.Generator().manual_seed(0)) * 8
    targets = torch.randint(0, 500, (37,), generator=torch.Generator().manual_seed(1))
    targets[:5] = big[:5].argmax(-1)
    logprobs, greedy = target_logprobs(big, targets)  # 37 rows: the last block is short
    torch.testing.assert_close(logprobs, big.log_softmax(-1)[torch.arange(37), targets])
    assert greedy.tolist() == (big.argmax(-1) == targets).tolist() and greedy[:5].all()
    whole = target_logprobs(big, targets, block=37)  # one block: what a GPU does
    torch.testing.assert_close(whole[0], logprobs)
    assert whole[1].tolist() == greedy.tolist()
