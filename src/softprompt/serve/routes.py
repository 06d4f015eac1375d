"""The endpoints: `/v1/classify`, `/v1/completions`, `/v1/models`, `/health`, `/metrics` on one APIRouter.

Routes read what `create_app` put on `app.state`: `backbone`, `bank`, `names` (prompt name -> bank
index), `config`, `metrics` and, once the app has started, `batcher`. Requests are encoded on the
event loop (one thread, so the tokenizer is never used concurrently) and scored by the batcher's
model thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from softprompt.analysis.measures import majority_vote, mean_logprob
from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Encoded, encode, length_of
from softprompt.serve.bank import BankEntry, UnknownPrompt
from softprompt.serve.batcher import Batcher, QueueFull
from softprompt.serve.config import ServeConfig, TooLong
from softprompt.serve.engine import Completion, CompletionJob, ScoreJob
from softprompt.serve.middleware import authorize
from softprompt.serve.schemas import ApiError, ClassifyRequest, CompletionRequest, TextInput
from softprompt.tasks.registry import DataError, Example, get_task, require

RETRY_AFTER_S = 1

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict:
    state = request.app.state
    return {"status": "ok", "prompts": len(state.bank) - 1, "in_flight": state.batcher.pending}


@router.get("/metrics", dependencies=[Depends(authorize)])
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(authorize)])
async def models(request: Request) -> dict:
    state = request.app.state  # `backbone`: what the weights run on (CPU/GPU, dtype, attention), as run.json records it
    return {"object": "list", "data": [entry.describe() for entry in state.bank], "backbone": state.backbone.hardware()}


@router.post("/v1/classify", dependencies=[Depends(authorize)])
async def classify(body: ClassifyRequest, request: Request) -> dict:
    state = request.app.state
    backbone, bank, config = state.backbone, state.bank, state.config
    ensemble = isinstance(body.prompt, list)
    members = body.prompt if ensemble else [body.prompt]
    if not members or len(members) != len(set(members)):
        raise ApiError(422, "prompt: an ensemble needs one or more distinct prompt names", "prompt")
    indices = [_entry_index(state.names, name, f"prompt[{i}]" if ensemble else "prompt") for i, name in enumerate(members)]
    if len(body.inputs) > config.max_inputs:
        raise ApiError(413, f"inputs: {len(body.inputs)} inputs, the limit is {config.max_inputs}; split the request",
                       "inputs", "request_too_large")
    entries = [bank[i] for i in indices]
    examples = [_example(raw, i, entries) for i, raw in enumerate(body.inputs)]
    longest = max(e.num_tokens for e in entries)
    encoded, dropped = zip(*(_encode(backbone, config, ex, i, longest) for i, ex in enumerate(examples)))
    job = ScoreJob([p for p in indices for _ in encoded], [item for _ in indices for item in encoded])
    (logprobs,) = await _submit(state.batcher, "score", [job], [len(job.items)])
    logprobs = logprobs.view(len(indices), len(encoded), -1)  # [K, E, C]
    results = [_classify_result(examples[e], logprobs[:, e], members, dropped[e], ensemble) for e in range(len(examples))]
    checksum = {m.name: m.checksum for m in entries} if ensemble else entries[0].checksum
    return {"prompt": body.prompt, "checksum": checksum, "results": results}


@router.post("/v1/completions", dependencies=[Depends(authorize)])
async def completions(body: CompletionRequest, request: Request) -> dict:
    state = request.app.state
    backbone, bank, config = state.backbone, state.bank, state.config
    entry = _entry_index(state.names, body.model, "model")
    prompts = _prompt_ids(backbone, body.prompt)
    if len(prompts) > config.max_inputs:
        raise ApiError(413, f"prompt: {len(prompts)} prompts, the limit is {config.max_inputs}; split the request",
                       "prompt", "request_too_large")
    if body.max_tokens > config.max_tokens:
        raise ApiError(422, f"max_tokens: {body.max_tokens} is over the server's limit {config.max_tokens}", "max_tokens")
    positions = context_length(backbone)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    jobs = []
    for i, (ids, _) in enumerate(prompts):
        if positions and bank[entry].num_tokens + len(ids) + body.max_tokens > positions:
            raise ApiError(413, f"prompt[{i}]: {len(ids)} tokens + max_tokens {body.max_tokens} + the prompt's "
                                f"{bank[entry].num_tokens} is over the model's context of {positions}", f"prompt[{i}]",
                           "input_too_long")
        jobs.append(CompletionJob(entry, ids, body.max_tokens, body.temperature, body.seed, body.logprobs or 0,
                                  body.echo, stop, backbone.tokenizer.eos_token_id))
    done = await _submit(state.batcher, "complete", jobs, [1] * len(jobs))
    choices = [_choice(backbone, i, c, text, body.logprobs is not None) for i, (c, (_, text)) in enumerate(zip(done, prompts))]
    used = sum(len(ids) for ids, _ in prompts)
    new = sum(len(c.ids) - c.num_prompt for c in done)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": used, "completion_tokens": new, "total_tokens": used + new}}


def context_length(backbone: Backbone) -> int | None:
    """The most positions the model takes (prompt + input + new tokens), or None where its config does not say."""
    return getattr(backbone.model.config.get_text_config(), "max_position_embeddings", None)


def _entry_index(names: dict[str, int], name: object, field: str) -> int:
    if not isinstance(name, str) or name not in names:
        raise ApiError(404, str(UnknownPrompt(name, list(names))), field, "unknown_prompt")
    return names[name]


async def _submit(batcher: Batcher, kind: str, jobs: list, rows: list[int]) -> list:
    """Every job's answer from the model thread, or 503 with Retry-After when the queue has no room for them all."""
    if batcher.pending + len(jobs) > batcher.max_queue:
        raise ApiError(503, f"the server is at its queue limit ({batcher.max_queue} jobs); retry after "
                            f"{RETRY_AFTER_S} s", None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)})
    try:
        return await asyncio.gather(*(batcher.submit(kind, job, n) for job, n in zip(jobs, rows)))
    except QueueFull as e:
        raise ApiError(503, str(e), None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)}) from None


def _prompt_ids(backbone: Backbone, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, text if given as text) per prompt; OpenAI's four shapes of `prompt`."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    vocab = backbone.model.get_input_embeddings().num_embeddings
    out = []
    for i, p in enumerate(prompt or []):
        ids = backbone.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(422, f"prompt[{i}]: token ids {bad[:5]} outside the vocabulary [0, {vocab})", f"prompt[{i}]")
        if not ids:
            raise ApiError(422, f"prompt[{i}]: the prompt has no tokens; send at least one", f"prompt[{i}]")
        out.append((ids, p if isinstance(p, str) else None))
    if not out:
        raise ApiError(422, "prompt: no prompts given", "prompt")
    return out


def _choice(backbone: Backbone, index: int, c: Completion, text: str | None, with_logprobs: bool) -> dict:
    tokenizer = backbone.tokenizer
    echoed = "" if not c.num_prompt else (text if text is not None else tokenizer.decode(c.ids[: c.num_prompt]))
    choice = {"index": index, "text": echoed + c.new_text, "logprobs": None, "finish_reason": c.finish_reason}
    if with_logprobs:
        tokens = [tokenizer.decode([t]) for t in c.ids]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": c.logprobs,
            "top_logprobs": [None if top is None else {tokenizer.decode([t]): lp for t, lp in top} for top in c.top],
            "text_offset": offsets,
        }
    return choice


def _example(raw: dict, i: int, entries: list[BankEntry]) -> tuple[Example, str | None]:
    """Input `i` of a classify request as (Example, task name or None for text inputs).

    Raises:
        ApiError: 422 naming the field at fault.
    """
    tasks = {entry.task for entry in entries}
    one_task = len(tasks) == 1 and None not in tasks
    if "choices" in raw or ("text" in raw and not one_task):  # WSC's raw fields have a "text" too
        try:
            given = TextInput.model_validate(raw)
        except Exception as e:  # pydantic ValidationError: name the first bad field
            first = e.errors()[0]
            field = f"inputs[{i}]" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            raise ApiError(422, f"{field}: {first['msg']}", field) from None
        if len(set(given.choices)) != len(given.choices):
            raise ApiError(422, f"inputs[{i}].choices: duplicate choices {given.choices}; give each choice once",
                           f"inputs[{i}].choices")
        return Example(given.text, tuple(given.choices), 0), None
    if not one_task:
        raise ApiError(422, f"inputs[{i}]: raw task fields need prompts of one task (these have tasks "
                            f"{sorted(map(str, tasks))}); send {{\"text\": ..., \"choices\": [...]}} instead", f"inputs[{i}]")
    task = get_task(tasks.pop())
    row = dict(raw)
    for name, expected in task.fields.items():
        if name != "label":  # the answer is what the server finds; a given label is ignored
            _require_nested(row, name, expected, f"inputs[{i}]")
    row["label"] = task.labels[0]
    try:
        example = task.to_example(row)
    except (DataError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ApiError(422, f"inputs[{i}]: not a valid {task.name} input ({e})", f"inputs[{i}]") from None
    return example, task.name


def _encode(backbone: Backbone, config: ServeConfig, example: tuple[Example, str | None], i: int,
            prompt_tokens: int) -> tuple[Encoded, int]:
    """(encoded input, context tokens dropped from its start): truncated as `evaluate` does, or 413.

    The limit is `--max-length`, and the model's context less the longest prompt that scores it.
    """
    example, _ = example
    positions = context_length(backbone)
    limit = min(config.max_length, positions - prompt_tokens) if positions else config.max_length
    try:
        full = encode(backbone.tokenizer, example, 1 << 30)
        if length_of(full) <= limit:
            return full, 0
        if config.too_long is TooLong.REJECT:
            raise ApiError(413, f"inputs[{i}]: {length_of(full)} tokens, over the limit of {limit} (--max-length, "
                                "and the model's context less the prompt); shorten it", f"inputs[{i}]", "input_too_long")
        cut = encode(backbone.tokenizer, example, limit)
    except ValueError as e:
        field = f"inputs[{i}].choices" if "choice" in str(e) else f"inputs[{i}]"
        status = 413 if "max_length" in str(e) else 422
        raise ApiError(status, f"{field}: {e}", field) from None
    return cut, len(full.context) - len(cut.context)


def _require_nested(row: dict, name: str, expected: type, where: str) -> None:
    """Check field `name` of a raw input (`a.b`: field `b` of object `a`), as the task's data loader does.

    Raises:
        ApiError: 422 naming the field (`inputs[i].a.b`).
    """
    *parents, leaf = name.split(".")
    node, prefix = row, f"{where}."
    try:
        for part in parents:
            node = require(node, part, dict, where=prefix)
            prefix += f"{part}."
        require(node, leaf, expected, where=prefix)
    except DataError as e:
        raise ApiError(422, str(e), f"{where}.{name}") from None


def _finite(values: torch.Tensor) -> list[float | None]:
    return [v if v == v and abs(v) != float("inf") else None for v in values.tolist()]


def _classify_result(example: tuple[Example, str | None], logprobs: torch.Tensor, members: list[str], dropped: int,
                     ensemble: bool) -> dict:
    """One input's answer from its `[K, C]` log-likelihoods (K prompts)."""
    example, task_name = example
    n = len(example.choices)
    logprobs = logprobs[:, :n]
    probs = torch.softmax(logprobs, -1)  # [K, C] normalised over the choices

    def answer(choice: int) -> dict:
        label = get_task(task_name).labels[choice] if task_name else None
        return {"choice": choice, "text": example.choices[choice], "label": label}

    out = {"truncated": dropped > 0, "dropped_tokens": dropped}
    if not ensemble:
        return {**answer(int(logprobs[0].argmax())), "logprobs": _finite(logprobs[0]), "probs": _finite(probs[0]), **out}
    votes = torch.bincount(logprobs.argmax(-1), minlength=n)  # [C]
    mean = mean_logprob(logprobs[:, None])[0]  # [K, 1, C] -> [C]
    vote = int(majority_vote(logprobs[:, None])[0])  # the analysis's rule: ties go to the higher mean log-probability
    members_out = [{"prompt": name, **answer(int(lp.argmax())), "logprobs": _finite(lp), "probs": _finite(p)}
                   for name, lp, p in zip(members, logprobs, probs)]
    return {**answer(vote), "votes": votes.tolist(), "mean_logprob": {**answer(int(mean.argmax())), "logprobs": _finite(mean)},
            "members": members_out, **out}
