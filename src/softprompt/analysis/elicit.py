"""Elicited descriptions: the frozen model says what a soft prompt means (InSPEcT / Patchscopes-style).

A frame is a text with one `{prompt}` placeholder where the soft prompt's rows go, e.g.
`The instruction "{prompt}" means:`. The model reads `[frame prefix; prompt rows; frame suffix]` and
continues greedily for a fixed number of tokens; what it writes is the description (Ramati,
Gottesman and Geva 2024, arXiv 2410.11660).

Placement: `core.forward.generate` continues token rows after a prompt's keys/values, and a
"prompt" there is any `[S, H]` block of embeddings at positions `0 .. S-1`. So the frame prefix's
token embeddings (leading special tokens such as BOS included, as the tokenizer adds them) and the
soft prompt are concatenated into one `[S + P, H]` block, and the suffix's tokens are the row that
`generate` continues: positions run on unbroken, exactly as for the sequence prefix + prompt +
suffix. Nothing builds `[prompt; input]` outside `core.forward`. The prefix and the suffix are
tokenized apart (the rows break the text there anyway). A frame must have words after the
placeholder: they ask for the description, and `generate` needs at least one token to continue.

Faithfulness, stated: (1) `word_overlap` with the task's label words and with its init text: the
share of the reference's distinct words (SQuAD-normalised: lower case, no punctuation, no articles)
that the description contains; (2) `hard_prompt_accuracy`: val accuracy with the description as a
text prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from softprompt.analysis.drift import Snapshot
from softprompt.analysis.reading import hard_prompt_accuracy
from softprompt.backbones.loading import Backbone
from softprompt.core.forward import generate, prompt_keys_values
from softprompt.core.prompt import embed_ids
from softprompt.data.batch import Encoded, special_prefix
from softprompt.eval.generation import normalize_answer
from softprompt.tasks.registry import Task

PLACEHOLDER = "{prompt}"
FRAMES = (
    'The instruction "{prompt}" means:',  # InSPEcT's question: the prompt quoted as an instruction
    "{prompt} In other words, the task is to",  # a paraphrase cue right after the rows
    'Q: What does "{prompt}" ask you to do?\nA:',  # question/answer form
)
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Elicitation:
    frame: str
    text: str  # what the model wrote, special tokens dropped
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Faithfulness:
    label_word_overlap: float  # share of the task's label words found in the description (NaN: no label words)
    init_text_overlap: float  # share of the init text's distinct words found in the description
    hard_prompt_accuracy: float  # val accuracy with the description as a text prompt, percent


def split_frame(frame: str) -> tuple[str, str]:
    """A frame's text before and after its one `{prompt}` placeholder.

    Raises:
        ValueError: no placeholder, more than one, or nothing after it (each message names the frame).
    """
    count = frame.count(PLACEHOLDER)
    if count != 1:
        raise ValueError(
            f"frame {frame!r} has {count} {PLACEHOLDER} placeholders; put exactly one where the soft prompt's rows go, "
            f"e.g. 'The instruction \"{PLACEHOLDER}\" means:'"
        )
    prefix, suffix = frame.split(PLACEHOLDER)
    if not suffix.strip():
        raise ValueError(f"frame {frame!r} ends at {PLACEHOLDER}; add the words that ask for the description after it (e.g. ' means:')")
    return prefix, suffix


def frame_embeddings(backbone: Backbone, prompt: Tensor, prefix: str) -> Tensor:
    """The block `generate` treats as its prompt: `[prefix tokens; soft prompt]`, `[S + P, H]` fp32 CPU.

    The prefix keeps the special tokens its tokenizer puts first (BOS), so the frame starts as text does.
    """
    tokenizer = backbone.tokenizer
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    with_specials = tokenizer(prefix)["input_ids"]
    ids = with_specials[: special_prefix(tokenizer, with_specials)] + ids
    prompt = prompt.detach().float().cpu()
    return torch.cat([embed_ids(backbone.model, ids), prompt]) if ids else prompt  # [S + P, H]


def elicit(backbone: Backbone, prompt: Tensor, frames: tuple[str, ...] = FRAMES, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Elicitation]:
    """What the frozen model writes about `prompt` `[P, H]` in each frame: greedy, at most `max_new_tokens`.

    Raises:
        ValueError: a malformed frame (`split_frame`), or `max_new_tokens < 1`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"a description needs at least one token; got max_new_tokens={max_new_tokens}")
    parts = [split_frame(frame) for frame in frames]  # every frame checked before any generation
    backbone = backbone.scoring()  # fp32 beside bf16 training weights: what the model says, as every reported number
    tokenizer, out = backbone.tokenizer, []
    for frame, (prefix, suffix) in zip(frames, parts):
        cache = prompt_keys_values(backbone.model, frame_embeddings(backbone, prompt, prefix))
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        [(ids, _)] = generate(backbone.model, cache, [suffix_ids], max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        out.append(Elicitation(frame, tokenizer.decode(ids, skip_special_tokens=True), tuple(ids)))
    return out


def elicit_over_training(
    backbone: Backbone, snapshots: list[Snapshot], frames: tuple[str, ...] = FRAMES, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[dict]:
    """`elicit` for each saved snapshot (`--snapshot-every`), sorted by step: `epoch`, `step`, `descriptions`.

    Raises:
        ValueError: a malformed frame, before any snapshot is read out.
    """
    for frame in frames:
        split_frame(frame)
    return [
        {"epoch": s.epoch, "step": s.step, "descriptions": [e.text for e in elicit(backbone, s.prompt, frames, max_new_tokens)]}
        for s in sorted(snapshots, key=lambda s: s.step)
    ]


def word_overlap(description: str, reference: str) -> float:
    """Share of `reference`'s distinct normalised words that occur in `description`; NaN for a reference with none."""
    wanted = set(normalize_answer(reference).split())
    if not wanted:
        return float("nan")
    return len(wanted & set(normalize_answer(description).split())) / len(wanted)


def description_faithfulness(backbone: Backbone, description: str, task: Task, items: list[Encoded], batch_size: int = 16) -> Faithfulness:
    """The stated faithfulness measures of one description for its task (see the module docstring).

    Raises:
        ValueError: no val examples to score the description on.
    """
    if not items:
        raise ValueError("faithfulness is scored on the prompt's task; give --task (no val examples were encoded)")
    return Faithfulness(
        word_overlap(description, " ".join(task.label_words)),
        word_overlap(description, task.init_text),
        hard_prompt_accuracy(backbone, description, items, batch_size),
    )


def format_elicitations(elicitations: list[Elicitation]) -> str:
    """One line per frame: the frame, then what the model wrote (newlines escaped)."""
    return "\n".join(f"{e.frame!r} -> {e.text!r}" for e in elicitations)
