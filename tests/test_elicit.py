"""Elicited descriptions on a tiny random model: placement in the frame, determinism, faithfulness, bad frames."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.analysis.elicit import (
    FRAMES,
    description_faithfulness,
    elicit,
    elicit_over_training,
    format_elicitations,
    frame_embeddings,
    split_frame,
    word_overlap,
)
from softprompt.analysis.drift import Snapshot
from softprompt.analysis.reading import hard_prompt_accuracy
from softprompt.core.forward import generate
from softprompt.core.prompt import embed_ids, embed_text
from softprompt.data.batch import encode
from softprompt.tasks.registry import TASKS, load_examples


def test_documented_frames_split_at_their_placeholder():
    assert split_frame(FRAMES[0]) == ('The instruction "', '" means:')
    assert split_frame(FRAMES[1]) == ("", " In other words, the task is to")
    assert all(split_frame(frame) for frame in FRAMES)


@pytest.mark.parametrize(
    ("frame", "match"),
    [("Describe the instruction:", r"frame 'Describe the instruction:' has 0 \{prompt\} placeholders; put exactly one"),
     ("{prompt} or {prompt} means:", r"has 2 \{prompt\} placeholders"),
     ('The instruction "{prompt}', r"ends at \{prompt\}; add the words that ask for the description after it")],
    ids=["no-placeholder", "two-placeholders", "nothing-after"],
)
def test_bad_frames_name_the_frame_and_the_fix(tiny_backbone, frame, match):
    with pytest.raises(ValueError, match=match):
        elicit(tiny_backbone, torch.zeros(2, tiny_backbone.hidden_size), (FRAMES[0], frame))


def test_elicit_needs_a_token(tiny_backbone):
    with pytest.raises(ValueError, match="at least one token; got max_new_tokens=0"):
        elicit(tiny_backbone, torch.zeros(2, tiny_backbone.hidden_size), max_new_tokens=0)


def test_frame_embeddings_put_the_rows_after_the_prefix(tiny_backbone):
    prompt = torch.randn(3, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    block = frame_embeddings(tiny_backbone, prompt, 'The instruction "')
    prefix = embed_text(tiny_backbone.model, tiny_backbone.tokenizer, 'The instruction "')
    assert torch.equal(block, torch.cat([prefix, prompt]))
    assert torch.equal(frame_embeddings(tiny_backbone, prompt, ""), prompt)  # SmolLM2 adds no BOS


def test_a_prompt_of_text_embeddings_reads_as_that_text_in_the_frame(tiny_backbone):
    """Rows that are token embeddings: eliciting equals plain greedy decoding of prefix + tokens + suffix."""
    tokenizer, model = tiny_backbone.tokenizer, tiny_backbone.model
    text_ids = tokenizer("Pick the correct choice", add_special_tokens=False)["input_ids"]
    frame = FRAMES[0]
    prefix, suffix = split_frame(frame)
    whole = tokenizer(prefix, add_special_tokens=False)["input_ids"] + text_ids + tokenizer(suffix, add_special_tokens=False)["input_ids"]
    [(expected, _)] = generate(model, None, [whole], 8, eos_token_id=tokenizer.eos_token_id)

    [got] = elicit(tiny_backbone, embed_ids(model, text_ids), (frame,), max_new_tokens=8)

    assert list(got.token_ids) == expected
    assert got.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_elicitation_prints_text_and_is_deterministic(tiny_backbone, capsys):
    prompt = torch.randn(4, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(1))
    first = elicit(tiny_backbone, prompt, max_new_tokens=6)
    print(format_elicitations(first))
    printed = capsys.readouterr().out
    assert [e.frame for e in first] == list(FRAMES) and all(f"{frame!r} -> " in printed for frame in FRAMES)
    assert all(1 <= len(e.token_ids) <= 6 and e.text for e in first)
    assert elicit(tiny_backbone, prompt, max_new_tokens=6) == first
    other = elicit(tiny_backbone, prompt * -3, max_new_tokens=6)
    assert other != first  # the description depends on the prompt's rows


def test_elicit_over_training_follows_the_snapshots_in_step_order(tiny_backbone):
    prompts = [torch.randn(3, tiny_backbone.hidden_size, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    snapshots = [Snapshot(2, 40, prompts[1]), Snapshot(0, 0, prompts[0])]
    history = elicit_over_training(tiny_backbone, snapshots, FRAMES[:2], max_new_tokens=4)
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 0), (2, 40)]
    assert history[1]["descriptions"] == [e.text for e in elicit(tiny_backbone, prompts[1], FRAMES[:2], 4)]
    with pytest.raises(ValueError, match="has 0 \\{prompt\\} placeholders"):
        elicit_over_training(tiny_backbone, snapshots, ("no placeholder:",))


def test_word_overlap():
    assert word_overlap("It says True or False.", " True False Neither") == pytest.approx(2 / 3)
    assert word_overlap("THE HYPOTHESIS", "Does the hypothesis entail") == pytest.approx(1 / 3)  # 'the' is an article: dropped
    assert word_overlap("anything", "") != word_overlap("anything", "")  # NaN: nothing to find
    assert math.isnan(word_overlap("anything", " ,"))


def test_description_faithfulness(tiny_backbone, data_dir):
    task = TASKS["cb"]
    items = [encode(tiny_backbone.tokenizer, e, 256) for e in load_examples(task, "val", data_dir)[:4]]
    description = "whether the hypothesis is True, False or neither"
    result = description_faithfulness(tiny_backbone, description, task, items)
    assert result.label_word_overlap == 1.0
    # init text: 'Does the hypothesis entail, contradict or is neutral about the premise?' -> 9 distinct words, 3 found
    assert task.init_text == "Does the hypothesis entail, contradict or is neutral about the premise?"
    assert result.init_text_overlap == pytest.approx(3 / 9)  # hypothesis, is, or
    assert result.hard_prompt_accuracy == hard_prompt_accuracy(tiny_backbone, description, items)
    with pytest.raises(ValueError, match="faithfulness is scored on the prompt's task; give --task"):
        description_faithfulness(tiny_backbone, description, task, [])
