"""Readable prompts by construction: a penalty that pulls each prompt row toward an anchor text's token.

Khashabi et al. 2022 ("Prompt Waywardness") add `G * mean over rows ||p_i - e_i||^2` to the task loss,
`e_i` the embedding of the anchor text's i-th token; google-research/prompt-tuning has it as
`extended/train/wayward.py`. G = 0 is ordinary prompt tuning. The anchor text is repeated or
truncated to the prompt's P rows by the text init's rule (`core.prompt.from_embedded_text`), so
anchoring to the init text anchors every row to the token it started on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from softprompt.analysis.interpret import init_token_ids, nearest_tokens_in_model
from softprompt.core.prompt import embed_text, from_embedded_text


def weight_text(weight: float) -> str:
    """G as Python's shortest exact float text, less a trailing `.0`: 0, 0.01, 1, 1e-05 (run folders and reports)."""
    return repr(float(weight)).removesuffix(".0")


def check_anchor(weight: float, text: str | None) -> None:
    """Validate `--anchor-weight` and `--anchor-text` (None: the init text, checked where it is chosen).

    Raises:
        ValueError: a negative, NaN or infinite weight, or an anchor text with no tokens.
    """
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--anchor-weight must be a finite number >= 0 (0: no anchor), got {weight}")
    if text is not None and not text.strip():
        raise ValueError(f"--anchor-text {text!r} has no words; give a non-empty text, or leave it out to anchor to the init text")


def anchor_ids(tokenizer: PreTrainedTokenizerBase, text: str, num_tokens: int) -> list[int]:
    """The anchor token of each of the `num_tokens` rows: the text's ids, repeated cyclically or truncated.

    Raises:
        ValueError: the text has no tokens (the message names `--anchor-text`).
    """
    _require_tokens(tokenizer, text)
    return init_token_ids(tokenizer, text, num_tokens)


def anchor_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, num_tokens: int) -> Tensor:
    """The anchor `[P, H]` (fp32, CPU): the text's token embeddings as the model sees them, repeated to P rows.

    Raises:
        ValueError: the text has no tokens (the message names `--anchor-text`).
    """
    _require_tokens(tokenizer, text)
    return from_embedded_text(embed_text(model, tokenizer, text), num_tokens)


def _require_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    if not tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"--anchor-text {text!r} has no tokens; give a text with at least one token")


def anchor_penalty(prompt: Tensor, anchor: Tensor, weight: float) -> Tensor:
    """`weight * mean over rows ||prompt_i - anchor_i||^2`: a scalar, differentiable in `prompt`.

    Args:
        prompt: `[P, H]`, the trained prompt.
        anchor: `[P, H]`, moved to the prompt's device and dtype (no gradient flows into it).
        weight: G >= 0.

    Raises:
        ValueError: the shapes differ.
    """
    if prompt.shape != anchor.shape:
        raise ValueError(
            f"anchor has shape {list(anchor.shape)} but the prompt is {list(prompt.shape)}; "
            "build the anchor with anchor_embeddings(..., num_tokens=--num-tokens) on the prompt's backbone"
        )
    anchor = anchor.detach().to(device=prompt.device, dtype=prompt.dtype)
    return weight * (prompt - anchor).pow(2).sum(-1).mean()


@torch.no_grad()
def faithfulness(prompt: Tensor, anchor_ids: list[int], model: PreTrainedModel) -> float:
    """Share of rows whose nearest vocabulary token (cosine, as `interpret`) is that row's anchor token.

    Args:
        prompt: `[P, H]`.
        anchor_ids: `[P]` token ids (`anchor_ids(...)`).

    Raises:
        ValueError: `anchor_ids` does not have one id per row.
    """
    if len(anchor_ids) != prompt.shape[0]:
        raise ValueError(f"{len(anchor_ids)} anchor ids for a prompt of {prompt.shape[0]} rows; give one id per row")
    _, ids = nearest_tokens_in_model(model, prompt.detach().float(), k=1)
    return float((ids[:, 0] == torch.tensor(anchor_ids)).float().mean())
