"""The reading made into a prompt: projection on one-hot rows, the reading's text, and what each keeps."""

from __future__ import annotations

import math

import pytest
import torch

from test_anchor import OneHotModel  # noqa: F401 - phase two: move it to conftest with the other tiny models
from softprompt.analysis.reading import Readout, hard_prompt_accuracy, kept_share, project_to_nearest, what_reading_keeps
from softprompt.analysis.rows import accuracies, gold_loglik
from softprompt.core.prompt import embed_ids, embed_text
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.tasks.registry import TASKS, load_examples


def test_projection_reads_off_one_hot_rows():
    prompt = torch.tensor([[0.9, 0.1, 0, 0, 0], [0, 0.2, 0.7, 0, 0.1], [-1.0, 0, 0, 0, 0.5]])  # nearest: 0, 2, 4
    projected, ids = project_to_nearest(OneHotModel(5), prompt)
    assert ids == [0, 2, 4]
    assert torch.equal(projected, torch.eye(5)[[0, 2, 4]])


def test_kept_share():
    assert kept_share(60.0, 80.0, 40.0) == pytest.approx(0.5)  # half the gain over no prompt
    assert kept_share(80.0, 80.0, 40.0) == 1.0
    assert kept_share(30.0, 80.0, 40.0) == pytest.approx(-0.25)  # worse than no prompt
    assert math.isnan(kept_share(50.0, 40.0, 40.0))  # the trained prompt gains nothing: nothing to keep


@pytest.fixture
def items(tokenizer, data_dir):
    return [encode(tokenizer, e, 256) for e in load_examples(TASKS["cb"], "val", data_dir)[:6]]


def test_a_prompt_of_token_embeddings_is_its_own_reading(tiny_backbone, items):
    """A prompt that is the embedding of real tokens: the projection is the prompt and the text is those tokens."""
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    ids = tokenizer("Does the hypothesis entail", add_special_tokens=False)["input_ids"]
    prompt = embed_ids(model, ids)
    projected, nearest = project_to_nearest(model, prompt)
    assert nearest == ids and torch.equal(projected, prompt)

    kept = what_reading_keeps(tiny_backbone, prompt, items, batch_size=4)

    assert kept.text == "Does the hypothesis entail"
    assert kept.projected == kept.trained == kept.hard_text  # the ids survive decode -> encode: the same numbers
    none = score(tiny_backbone, None, items)
    assert kept.none == Readout(float(accuracies(none)[0]), float(gold_loglik(none)[0]))
    assert kept.none.loglik != kept.trained.loglik


def test_a_random_prompt_is_scored_as_its_projection(tiny_backbone, items):
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    prompt = torch.randn(4, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(2))
    projected, ids = project_to_nearest(model, prompt)
    vocab = model.get_input_embeddings()(torch.arange(model.get_input_embeddings().num_embeddings))
    cosines = torch.nn.functional.normalize(prompt, dim=-1) @ torch.nn.functional.normalize(vocab, dim=-1).T
    assert ids == cosines.argmax(-1).tolist()
    assert not torch.equal(projected, prompt)

    kept = what_reading_keeps(tiny_backbone, prompt, items, batch_size=4)

    alone = score(tiny_backbone, projected, items)
    assert kept.projected.accuracy == float(accuracies(alone)[0])
    assert kept.projected.loglik == pytest.approx(float(gold_loglik(alone)[0]), abs=1e-5)
    assert kept.trained.loglik == pytest.approx(float(gold_loglik(score(tiny_backbone, prompt, items))[0]), abs=1e-5)
    assert kept.projected.loglik != pytest.approx(kept.trained.loglik, abs=1e-5)
    assert kept.text == tokenizer.decode(ids)
    assert kept.hard_text.accuracy == hard_prompt_accuracy(tiny_backbone, kept.text, items)
    assert kept.kept_projected == pytest.approx(kept_share(kept.projected.accuracy, kept.trained.accuracy, kept.none.accuracy), nan_ok=True)


def test_hard_prompt_accuracy_of_text_and_of_nothing(tiny_backbone, items):
    text_prompt = embed_text(tiny_backbone.model, tiny_backbone.tokenizer, "True or False?")
    assert hard_prompt_accuracy(tiny_backbone, "True or False?", items) == float(accuracies(score(tiny_backbone, text_prompt, items))[0])
    assert hard_prompt_accuracy(tiny_backbone, "", items) == float(accuracies(score(tiny_backbone, None, items))[0])


def test_reading_needs_examples(tiny_backbone):
    with pytest.raises(ValueError, match="scored on the prompt's task; give --task"):
        what_reading_keeps(tiny_backbone, torch.zeros(2, tiny_backbone.hidden_size), [])
