"""Row ablation on legible tensors and a hand-made case, and the persisted-vs-drifted permutation test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softprompt.analysis.rows import (
    Replacement,
    ablated_prompts,
    gold_loglik,
    importance_vector,
    init_embeddings,
    persisted_vs_drifted,
    rank_rows,
    row_importance,
    vocab_mean_embedding,
)
from softprompt.data.batch import encode, train_batch
from softprompt.eval.scoring import score
from softprompt.tasks.registry import TASKS, load_examples
from softprompt.train.loop import loss_step


def test_ablated_prompts_read_off_one_hot_rows():
    prompt = torch.eye(3) * 2  # row k is 2 e_k
    ablated = ablated_prompts(prompt, torch.full((3,), -1.0))
    for k in range(3):
        expected = prompt.clone()
        expected[k] = -1.0
        assert torch.equal(ablated[k], expected)
    per_row = ablated_prompts(prompt, torch.eye(3)[[2, 0, 1]])  # row k replaced by e_{k-1}
    assert [per_row[k, k].argmax().item() for k in range(3)] == [2, 0, 1]
    assert torch.equal(prompt, torch.eye(3) * 2)  # the input stays as it is


@pytest.mark.parametrize("tiny_backbone", ["llama", "gemma"], ids=["llama", "gemma"], indirect=True)
def test_vocab_mean_is_through_get_input_embeddings(tiny_backbone):
    embedding = tiny_backbone.model.get_input_embeddings()
    seen = embedding(torch.arange(embedding.num_embeddings)).mean(0)
    assert torch.allclose(vocab_mean_embedding(tiny_backbone.model, chunk_size=5000), seen, atol=1e-6)
    if tiny_backbone.name == "random-gemma3_text":  # Gemma scales by sqrt(H): .weight would be wrong
        assert not torch.allclose(seen, embedding.weight.mean(0), atol=1e-4)


@pytest.fixture
def items(tokenizer, data_dir):
    return [encode(tokenizer, e, 256) for e in load_examples(TASKS["cb"], "val", data_dir)[:6]]


def test_the_one_trained_row_is_the_most_important(tiny_backbone, items):
    """Every row is its init except row 2, trained alone to raise the gold log-likelihood: only row 2 matters."""
    init = torch.randn(5, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05
    row = init[2].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([row], lr=0.5)
    batch = train_batch(items, tiny_backbone.tokenizer.pad_token_id)
    for _ in range(15):
        prompt = torch.cat([init[:2], row[None], init[3:]])
        optimizer.zero_grad()
        loss_step(tiny_backbone, prompt, batch).backward()
        optimizer.step()
    trained = torch.cat([init[:2], row.detach()[None], init[3:]])

    ablation = row_importance(tiny_backbone, trained, items, init, batch_size=4)

    init_rows = rank_rows(ablation, Replacement.INIT)
    assert init_rows[0].position == 2 and init_rows[0].loglik_drop > 0
    assert all(r.loglik_drop == 0 and r.accuracy_drop == 0 for r in init_rows[1:])  # ablating an untrained row is a no-op
    assert ablation.loglik == pytest.approx(float(gold_loglik(score(tiny_backbone, trained, items))[0]), abs=1e-5)
    mean_rows = {r.position: r for r in rank_rows(ablation, Replacement.MEAN)}
    alone = trained.clone()
    alone[4] = vocab_mean_embedding(tiny_backbone.model)
    expected = ablation.loglik - float(gold_loglik(score(tiny_backbone, alone, items))[0])
    assert mean_rows[4].loglik_drop == pytest.approx(expected, abs=1e-5)  # the batched ablation = scoring it alone
    assert importance_vector(ablation, Replacement.INIT).argmax() == 2


def test_init_embeddings_embed_the_run_init_ids(tiny_backbone):
    model = tiny_backbone.model
    assert torch.equal(init_embeddings(model, [5, 7, 5]), model.get_input_embeddings()(torch.tensor([5, 7, 5])))
    assert init_embeddings(model, None) is None


def test_random_init_gets_only_the_mean_replacement(tiny_backbone, items):
    prompt = torch.randn(3, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(1))
    ablation = row_importance(tiny_backbone, prompt, items[:2], None)
    assert {r.replacement for r in ablation.rows} == {Replacement.MEAN} and len(ablation.rows) == 3
    with pytest.raises(ValueError, match="no rows were ablated with the 'init' replacement"):
        rank_rows(ablation, Replacement.INIT)


def test_row_importance_errors(tiny_backbone, items):
    prompt = torch.zeros(3, tiny_backbone.hidden_size)
    with pytest.raises(ValueError, match="needs the prompt's task and its val examples; give --task"):
        row_importance(tiny_backbone, prompt, [], None)
    with pytest.raises(ValueError, match=r"init has shape \[2, 16\] but the prompt is \[3, 16\]"):
        row_importance(tiny_backbone, prompt, items, torch.zeros(2, tiny_backbone.hidden_size))
    with pytest.raises(ValueError, match="rank rows by 'loglik' or 'accuracy', got 'size'"):
        rank_rows(row_importance(tiny_backbone, prompt, items[:1], None), by="size")


def test_permutation_test_exact_small_case():
    # One prompt, rows of importance 4 3 2 1, the two most important persisted: 1 of C(4,2) = 6 labellings is as extreme.
    result = persisted_vs_drifted([[4, 3, 2, 1]], [[True, True, False, False]])
    assert result.statistic == pytest.approx(3.5 - 1.5)
    assert result.p_value == pytest.approx(1 / 6)
    assert (result.persisted, result.drifted, result.prompts, result.permutations, result.exact) == (2, 2, 1, 6, True)
    # Two such prompts (another scale): 1 of 6 * 6 joint labellings; a prompt with no drifted row is left out.
    pooled = persisted_vs_drifted([[4, 3, 2, 1], [40, 30, 20, 10], [5, 5]], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1]])
    assert pooled.p_value == pytest.approx(1 / 36) and pooled.prompts == 2 and pooled.permutations == 36
    assert pooled.statistic == pytest.approx((4 + 3 + 40 + 30) / 4 - (2 + 1 + 20 + 10) / 4)
    # The least important row persisted: every labelling is at least as extreme.
    assert persisted_vs_drifted([[4, 3, 2, 1]], [[0, 0, 0, 1]]).p_value == 1.0


def test_permutation_test_sampled_matches_exact():
    rng = np.random.default_rng(3)
    values = [rng.normal(size=7) for _ in range(3)]
    flags = [rng.permutation([True] * 3 + [False] * 4) for _ in range(3)]
    exact = persisted_vs_drifted(values, flags)
    sampled = persisted_vs_drifted(values, flags, permutations=20000, seed=1, exact_limit=10)
    assert exact.exact and not sampled.exact and sampled.permutations == 20001
    assert sampled.statistic == pytest.approx(exact.statistic)
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.015)
    assert persisted_vs_drifted(values, flags, permutations=500, seed=1, exact_limit=10) == persisted_vs_drifted(
        values, flags, permutations=500, seed=1, exact_limit=10
    )  # seeded


def test_permutation_test_bad_input_and_nothing_to_compare():
    with pytest.raises(ValueError, match="2 importance vectors but 1 persisted vectors"):
        persisted_vs_drifted([[1, 2], [3, 4]], [[True, False]])
    with pytest.raises(ValueError, match=r"prompt 0: \(3,\) importances but \(2,\) persisted flags"):
        persisted_vs_drifted([[1, 2, 3]], [[True, False]])
    nothing = persisted_vs_drifted([[1, 2]], [[True, True]])
    assert math.isnan(nothing.statistic) and math.isnan(nothing.p_value) and nothing.prompts == 0
