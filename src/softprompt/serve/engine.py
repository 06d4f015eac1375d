"""What the model thread runs: scoring for `/v1/classify`, and completions with echo and log-probs.

Every forward goes through `core.forward` (the one forward-with-prompt); a prompt's keys/values
come from the bank, computed once at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.core.forward import logits_at
from softprompt.data.batch import Encoded
from softprompt.eval.scoring import score
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
    """Summed log-likelihood of every choice of every item, each item under its own prompt.

    Returns:
        per job, `[E, C]` fp32 (-inf where an item has fewer than C choices).
    """
    prompt_of = [p for job in jobs for p in job.prompt_of]
    items = [item for job in jobs for item in job.items]
    widest = max(len(item.choices) for item in items)
    logprobs = torch.full((len(items), widest), float("-inf"))
    for entry in sorted(set(prompt_of)):  # one score() per prompt in the batch
        index = [i for i, p in enumerate(prompt_of) if p == entry]
        scores = score(backbone, bank[entry].prompt, [items[i] for i in index], batch_size)
        logprobs[index, : scores.logprobs.shape[-1]] = scores.logprobs[0]
    out, start = [], 0
    for job in jobs:
        out.append(logprobs[start : start + len(job.items)])
        start += len(job.items)
    return out


def _logits(backbone: Backbone, entry: BankEntry, ids: list[int], positions: list[int]) -> Tensor:
    """Next-token logits at `positions` of one row `ids` under `entry`'s prompt: `[len(positions), V]`."""
    device = backbone.device
    input_ids = torch.tensor([ids], device=device)
    where = torch.tensor(positions, device=device)
    return logits_at(
        backbone.model, entry.prompt, input_ids, torch.ones_like(input_ids), torch.zeros_like(where), where,
        prompt_cache=entry.cache,
    )


def _top(logprobs: Tensor, k: int) -> list[tuple[int, float]] | None:
    if k == 0:
        return None
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


@torch.inference_mode()
def complete(backbone: Backbone, entry: BankEntry, job: CompletionJob) -> Completion:
    """Echo-score the prompt (if asked) and generate up to `max_tokens` tokens.

    Greedy at temperature 0; otherwise sampled from softmax(logits / temperature) with a generator
    seeded by `job.seed`, so a seeded request gives the same tokens every time. Generation stops at
    the end-of-sequence token or when the new text contains a stop string (cut there).
    """
    ids = list(job.ids)
    positions = list(range(len(ids))) if job.echo else [len(ids) - 1]
    logprobs = torch.log_softmax(_logits(backbone, entry, ids, positions), -1)  # [len(positions), V]
    result = Completion([], [], [], 0)
    if job.echo:
        result.ids, result.num_prompt = list(ids), len(ids)
        result.logprobs = [None] + [float(logprobs[j, ids[j + 1]]) for j in range(len(ids) - 1)]
        result.top = [None] + [_top(logprobs[j], job.top_logprobs) for j in range(len(ids) - 1)]
    generator = torch.Generator().manual_seed(job.seed if job.seed is not None else torch.seed())
    new: list[int] = []
    next_logprobs = logprobs[-1]  # [V]
    for step in range(job.max_tokens):
        if step > 0:
            next_logprobs = torch.log_softmax(_logits(backbone, entry, ids + new, [len(ids) + len(new) - 1])[0], -1)
        if job.temperature == 0:
            token = int(next_logprobs.argmax())
        else:
            probs = torch.softmax(next_logprobs.cpu() / job.temperature, -1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        new.append(token)
        result.ids.append(token)
        result.logprobs.append(float(next_logprobs[token]))
        result.top.append(_top(next_logprobs, job.top_logprobs))
        if token == job.eos_token_id:
            result.finish_reason = "stop"
            break
        text = backbone.tokenizer.decode(new)
        cut = min((text.find(s) for s in job.stop if s in text), default=-1)
        if cut >= 0:
            result.finish_reason, result.new_text = "stop", text[:cut]
            return result
    result.new_text = backbone.tokenizer.decode(new, skip_special_tokens=True)
    return result
