"""The soft prompt: a `[P, H]` fp32 tensor and its initialisers (the forward is in `core.forward`).

Initialisers are plain functions (tensors in, `[P, H]` out); callers embed token ids through
`model.get_input_embeddings()(ids)`, so models that scale their embeddings (Gemma) get it right.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class InitMethod(str, Enum):
    TEXT = "text"
    CLASS_LABELS = "class-labels"
    VOCAB = "vocab"
    RANDOM = "random"
    PROMPT = "prompt"  # another trained prompt (SPoT, Vu et al. 2022): --init-from RUN_DIR_OR_ADAPTER


def from_embedded_text(text_embeddings: Tensor, num_tokens: int) -> Tensor:
    """Lester's text init: the text's token embeddings `[T, H]`, repeated or truncated to `[P, H]`.

    Raises:
        ValueError: the text has no tokens.
    """
    if text_embeddings.shape[0] == 0:
        raise ValueError("the init text has no tokens; pass a non-empty --init-text")
    repeats = -(-num_tokens // text_embeddings.shape[0])  # ceil
    return text_embeddings.repeat(repeats, 1)[:num_tokens].clone()


def from_sample_of_embeddings(embeddings: Tensor, num_tokens: int, generator: torch.Generator) -> Tensor:
    """Rows sampled without replacement (with, if too few) from `embeddings` `[V, H]`: `[P, H]`."""
    replace = embeddings.shape[0] < num_tokens
    index = torch.multinomial(torch.ones(embeddings.shape[0]), num_tokens, replacement=replace, generator=generator)
    return embeddings[index].clone()


def from_class_labels(label_embeddings: Tensor, vocab_embeddings: Tensor, num_tokens: int, generator: torch.Generator) -> Tensor:
    """Lester's class-label init: the label tokens' embeddings first, then sampled vocabulary: `[P, H]`."""
    labels = label_embeddings[:num_tokens]
    rest = num_tokens - labels.shape[0]
    if rest == 0:
        return labels.clone()
    return torch.cat([labels, from_sample_of_embeddings(vocab_embeddings, rest, generator)])


def random_uniform(num_tokens: int, hidden_size: int, generator: torch.Generator, scale: float = 0.5) -> Tensor:
    """Uniform in [-scale, scale] (Lester's random init): `[P, H]`."""
    return (torch.rand(num_tokens, hidden_size, generator=generator) * 2 - 1) * scale


def from_prompt(source: Tensor, num_tokens: int, hidden_size: int, origin: str = "the source prompt") -> Tensor:
    """SPoT's init: a copy of another task's trained prompt `[P, H]`, which must have the wanted shape.

    Raises:
        ValueError: the shapes differ (both are named, and the flag that fixes it).
    """
    if tuple(source.shape) != (num_tokens, hidden_size):
        raise ValueError(
            f"{origin} has shape {list(source.shape)}, but this prompt is [{num_tokens}, {hidden_size}] "
            f"(--num-tokens {num_tokens}, the backbone's hidden size {hidden_size}); set --num-tokens {source.shape[0]} "
            "or start from a prompt trained on this backbone with this length"
        )
    return source.detach().float().clone()


def embed_ids(model: PreTrainedModel, ids: list[int]) -> Tensor:
    """Token embeddings as the model sees them, fp32 on CPU: `[len(ids), H]`."""
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=device)).float().cpu()


def embed_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> Tensor:
    """A text's token embeddings (no special tokens), fp32 on CPU: `[T, H]`."""
    return embed_ids(model, tokenizer(text, add_special_tokens=False)["input_ids"])
