"""Generation tasks (`output_type: generate_until`): greedy decoding with a soft prompt, exact match and token F1.

Training needs nothing here: a generate_until example is `Example(text, (target,), 0)`, so the
loss is the target's tokens (teacher forcing), as for any multi-token answer. Evaluation decodes
greedily through `core.forward.generate` (the one forward-with-prompt), cuts the text at the task's
stop strings and compares it with the target under SQuAD's normalisation.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.core.forward import generate, prompt_keys_values
from softprompt.tasks.data import Example

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD's token F1 (bag of normalised tokens), the best over the references."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        wanted = normalize_answer(reference).split()
        if not predicted or not wanted:
            best = max(best, float(predicted == wanted))
            continue
        common = sum((Counter(predicted) & Counter(wanted)).values())
        if common:
            precision, recall = common / len(predicted), common / len(wanted)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the stop strings (lm-eval's `until`, OpenAI's `stop`); empty ones never match.

    The result is shorter than `text` exactly when a stop string was found.
    """
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def generate_texts(
    backbone: Backbone, prompt: Tensor | None, texts: list[str], max_new_tokens: int = 32,
    until: tuple[str, ...] = ("\n\n",), max_length: int = 256, batch_size: int = 16,
) -> list[str]:
    """What the prompted model writes after each text: greedy, at most `max_new_tokens` tokens.

    Each text is cut before the first of `until` and stripped of surrounding whitespace. A context
    keeps its last `max_length - max_new_tokens` tokens (at least one), as in scoring.
    """
    model, tokenizer = backbone.scoring().model, backbone.tokenizer  # fp32 beside bf16 training weights
    room = max(1, max_length - max_new_tokens)
    cache = None if prompt is None else prompt_keys_values(model, prompt.to(backbone.device))
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(t)["input_ids"][-room:] for t in texts[start : start + batch_size]]
        for tokens, _ in generate(model, cache, rows, max_new_tokens, eos_token_id=tokenizer.eos_token_id):
            out.append(cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), until).strip())
    return out


def generation_metrics(predictions: list[str], examples: list[Example], delimiter: str = " ") -> dict[str, float]:
    """Exact match and token F1 (percent) of each prediction against its example's targets (all choices)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples; give one per example")
    refs = [[c.removeprefix(delimiter) for c in e.choices] for e in examples]
    n = max(len(examples), 1)
    return {
        "generated_exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, refs)) / n,
        "token_f1": 100.0 * sum(token_f1(p, r) for p, r in zip(predictions, refs)) / n,
        "n": len(examples),
    }
