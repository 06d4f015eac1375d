"""What the model thread runs: scoring for `/v1/classify`, and completions with echo and log-probs.

Every forward goes through `core.forward` (the one forward-with-prompt); a prompt's keys/values
come from the bank, computed once at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.core.forward import generate, logits_at
from softprompt.data.batch import Encoded
from softprompt.eval.generation import cut_at_stop
from softprompt.eval.scoring import score_mixed
from softprompt.serve.bank import BankEntry


@dataclass(frozen=True)
class ScoreJob:
    """Items to score, each under its own bank entry: a `/v1/classify` request (ensembles included)."""

    prompt_of: list[int]  # [E] bank index of each item
    items: list[Encoded]  # [E]


@dataclass(frozen=True)
class CompletionJob:
    entry: int  # bank index
    ids: list[int]  # the prompt's tokens (>= 1)
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None
    top_logprobs: int = 0  # how many alternatives to list per position (0: none)
    echo: bool = False  # also score the prompt's own tokens
    stop: tuple[str, ...] = ()
    eos_token_id: int | None = None


@dataclass
class Completion:
    """Tokens with their log-probabilities under the model (before temperature), prompt tokens first if echoed."""

    ids: list[int]
    logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    top: list[list[tuple[int, float]] | None]  # per token: (id, log-prob) of the most likely tokens
    num_prompt: int  # how many of `ids` are the echoed prompt (0 without echo)
    finish_reason: str = "length"
    new_text: str = field(default="")


def run_batch(backbone: Backbone, bank: list[BankEntry], batch_size: int, kind: str, jobs: list) -> list:
    """One batch of jobs of one kind: `[E, C]` log-likelihood tensors for score jobs, Completions else."""
    if kind == "score":
        return score_jobs(backbone, bank, jobs, batch_size)
    return [complete(backbone, bank[job.entry], job) for job in jobs]


def score_jobs(backbone: Backbone, bank: list[BankEntry], jobs: list[ScoreJob], batch_size: int) -> list[Tensor]:
    """Summed log-likelihood of every choice of every item, each item under its own prompt, in shared forwards.

    Returns:
        per job, `[E, C]` fp32 (-inf where an item has fewer than C choices).
    """
    prompt_of = [p for job in jobs for p in job.prompt_of]
    items = [item for job in jobs for item in job.items]
    logprobs = score_mixed(backbone, [entry.cache for entry in bank], prompt_of, items, batch_size).logprobs[0]  # [E, C]
    out, start = [], 0
    for job in jobs:
        out.append(logprobs[start : start + len(job.items)])
        start += len(job.items)
    return out


def _top(logprobs: Tensor, k: int) -> list[tuple[int, float]] | None:
    if k == 0:
        return None
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


@torch.inference_mode()
def complete(backbone: Backbone, entry: BankEntry, job: CompletionJob) -> Completion:
    """Generate up to `max_tokens` tokens and, if asked, score the prompt's own tokens (echo).

    Greedy at temperature 0; otherwise sampled from softmax(logits / temperature) with a generator
    seeded by `job.seed`, so a seeded request gives the same tokens every time. The text is cut at
    the first stop string. Log-probabilities (model's, before temperature) and the top alternatives
    come from one teacher-forced forward over prompt + new tokens, so a token's log-prob equals its
    top alternative's exactly when it is the argmax (how lm-eval tells greedy continuations).
    """
    ids, new, finish = list(job.ids), [], "length"
    if job.max_tokens > 0:
        generator = torch.Generator(backbone.device).manual_seed(job.seed if job.seed is not None else torch.seed())
        ((new, _),) = generate(backbone.model, entry.cache, [ids], job.max_tokens, job.temperature, generator,
                               job.eos_token_id)
        if job.eos_token_id in new:
            finish = "stop"
    new, text, cut = _cut_at_stop(backbone, new, job.stop)
    finish = "stop" if cut else finish
    first = 0 if job.echo else len(ids) - 1  # the position predicting the first token reported
    result = Completion(ids + new if job.echo else new, [], [], len(ids) if job.echo else 0, finish, text)
    if job.top_logprobs or job.echo or new:
        scored = ids + new
        positions = list(range(first, len(scored) - 1))
        lp = torch.log_softmax(_logits(backbone, entry, scored, positions), -1) if positions else None  # [N, V]
        targets = scored[first + 1 :]
        result.logprobs = ([None] if job.echo else []) + [float(lp[j, t]) for j, t in enumerate(targets)]
        result.top = ([None] if job.echo else []) + [_top(lp[j], job.top_logprobs) for j in range(len(targets))]
    return result


def _cut_at_stop(backbone: Backbone, new: list[int], stop: tuple[str, ...]) -> tuple[list[int], str, bool]:
    """(tokens kept, text, whether a stop string cut it): the text ends before the first stop string."""
    text = backbone.tokenizer.decode(new, skip_special_tokens=True)
    kept = cut_at_stop(text, stop)
    if len(kept) == len(text):
        return new, text, False
    # the tokens up to the first one whose text reaches past the cut
    keep = next((j for j in range(1, len(new) + 1) if len(backbone.tokenizer.decode(new[:j], skip_special_tokens=True)) > len(kept)), len(new))
    return new[:keep], kept, True


def _logits(backbone: Backbone, entry: BankEntry, ids: list[int], positions: list[int]) -> Tensor:
    """Next-token logits at `positions` of one row `ids` under `entry`'s prompt: `[len(positions), V]`."""
    device = backbone.device
    input_ids = torch.tensor([ids], device=device)
    where = torch.tensor(positions, device=device)
    return logits_at(
        backbone.model, None, input_ids, torch.ones_like(input_ids), torch.zeros_like(where), where,
        prompt_cache=entry.cache,
    ).float()
