"""What the nearest-token reading keeps: the paper's reading made into a prompt, and scored.

Two prompts are built from a trained `[P, H]` prompt's nearest tokens (cosine, as `interpret`):
- projected: every row replaced by the embedding of its nearest token, i.e. the token ids
  themselves as a hard prompt;
- hard text: those tokens decoded to a string and tokenized again (what a person would paste as an
  instruction). It differs from the projection where the ids do not survive decode -> encode.
Both are scored on val beside the trained prompt and no prompt. "Kept" is the share of the trained
prompt's gain over no prompt that a reading keeps: `(reading - none) / (trained - none)`, 1 = all of
it, 0 = none, negative = worse than no prompt, NaN where the trained prompt gains nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from softprompt.analysis.interpret import nearest_tokens_in_model
from softprompt.analysis.rows import accuracies, gold_loglik
from softprompt.backbones.loading import Backbone
from softprompt.core.prompt import embed_ids, embed_text
from softprompt.data.batch import Encoded
from softprompt.eval.scoring import Scores, score


@dataclass(frozen=True)
class Readout:
    accuracy: float  # val accuracy, percent
    loglik: float  # mean gold-choice log-likelihood (continuous: small val sets tie on accuracy)


@dataclass(frozen=True)
class ReadingKept:
    trained: Readout
    projected: Readout  # every row on its nearest token's embedding
    hard_text: Readout  # the nearest tokens' string as a text prompt
    none: Readout  # no prompt
    text: str  # the nearest tokens decoded
    kept_projected: float  # accuracy: (projected - none) / (trained - none)
    kept_hard_text: float  # accuracy: (hard_text - none) / (trained - none)


def project_to_nearest(model: PreTrainedModel, prompt: Tensor) -> tuple[Tensor, list[int]]:
    """Each row replaced by the embedding (as the model sees it) of its nearest vocabulary token.

    Args:
        prompt: `[P, H]`.

    Returns:
        the projected prompt `[P, H]` (fp32, CPU) and the `[P]` nearest token ids.
    """
    _, ids = nearest_tokens_in_model(model, prompt.detach().float().cpu(), k=1)
    nearest = ids[:, 0].tolist()
    return embed_ids(model, nearest), nearest


def kept_share(reading: float, trained: float, none: float) -> float:
    """The share of the trained prompt's gain over no prompt that `reading` keeps; NaN when there is no gain."""
    gain = trained - none
    return (reading - none) / gain if gain != 0 else math.nan


def hard_prompt_accuracy(backbone: Backbone, text: str, items: list[Encoded], batch_size: int = 16) -> float:
    """Val accuracy (percent) with `text` as a hard prompt: its token embeddings in the soft prompt's place.

    A text with no tokens is no prompt (so an empty reading or description scores as zero-shot).
    """
    return _text_readout(backbone, text, items, batch_size).accuracy


def _text_readout(backbone: Backbone, text: str, items: list[Encoded], batch_size: int) -> Readout:
    has_tokens = bool(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
    embedded = embed_text(backbone.model, backbone.tokenizer, text) if has_tokens else None  # [T, H] or no prompt
    return _readouts(score(backbone, embedded, items, batch_size))[0]


def _readouts(scores: Scores) -> list[Readout]:
    return [Readout(float(a), float(ll)) for a, ll in zip(accuracies(scores), gold_loglik(scores))]


def reading_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The nearest tokens as one string, as the reading would be written down (special tokens kept)."""
    return tokenizer.decode(token_ids)


def what_reading_keeps(backbone: Backbone, prompt: Tensor, items: list[Encoded], batch_size: int = 16) -> ReadingKept:
    """Accuracy of the trained prompt, its projection onto nearest tokens, their text, and no prompt.

    Args:
        prompt: `[P, H]` trained prompt.
        items: the encoded val examples of its task.

    Raises:
        ValueError: no examples.
    """
    if not items:
        raise ValueError("the reading is scored on the prompt's task; give --task (no val examples were encoded)")
    projected, ids = project_to_nearest(backbone.model, prompt)
    both = score(backbone, torch.stack([prompt.detach().float().cpu(), projected]), items, batch_size)  # same P: one pass
    trained, projected = _readouts(both)
    text = reading_text(backbone.tokenizer, ids)
    hard = _text_readout(backbone, text, items, batch_size)
    none = _readouts(score(backbone, None, items, batch_size))[0]
    kept = lambda reading: kept_share(reading.accuracy, trained.accuracy, none.accuracy)  # noqa: E731
    return ReadingKept(trained, projected, hard, none, text, kept(projected), kept(hard))
