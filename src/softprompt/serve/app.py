"""The HTTP app: FastAPI routes, pydantic request models, Prometheus metrics, API-key auth, JSON errors.

Every error is a JSON body `{"error": {"message", "type", "field"}}` with a 4xx status naming the
request field at fault; only a bug gives a 500. Requests are encoded on the event loop (one
thread, so the tokenizer is never used concurrently) and scored by the batcher's model thread.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Encoded, encode, length_of
from softprompt.serve.bank import BankEntry, UnknownPrompt
from softprompt.serve.batcher import Batcher, QueueFull
from softprompt.serve.config import ServeConfig, TooLong
from softprompt.serve.engine import Completion, CompletionJob, ScoreJob, run_batch
from softprompt.tasks.registry import DataError, Example, get_task, require

RETRY_AFTER_S = 1
ENDPOINTS = ("/v1/classify", "/v1/completions", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    """A 4xx answer: status, message (with the fix) and the request field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind, self.headers = status, message, field, kind, headers


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str] = Field(description="A prompt name, or several for an ensemble.")
    inputs: list[dict[str, Any]] = Field(min_length=1, description="Task fields, or {text, choices}.")


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    choices: list[str] = Field(min_length=1)


class CompletionRequest(BaseModel):
    """OpenAI's `/v1/completions` body, the part lm-evaluation-harness's `local-completions` sends."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    n: Literal[1] = 1
    stream: Literal[False] = False
    top_p: Literal[1, 1.0] = 1.0
    user: str | None = None


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    batch_rows: Histogram
    queue_wait: Histogram
    latency: Histogram
    in_flight: Gauge


def make_metrics() -> Metrics:
    registry = CollectorRegistry()  # one per app: two servers in one process (tests) do not share counts
    return Metrics(
        registry,
        Counter("softprompt_requests", "HTTP requests answered", ["endpoint", "status"], registry=registry),
        Counter("softprompt_errors", "Requests answered with an error", ["endpoint", "type"], registry=registry),
        Histogram("softprompt_batch_rows", "Rows per forward batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry),
        Histogram("softprompt_queue_wait_seconds", "Time a job waited before its batch ran", registry=registry),
        Histogram("softprompt_request_latency_seconds", "Request latency", ["endpoint"], registry=registry),
        Gauge("softprompt_jobs_in_flight", "Jobs queued or running", registry=registry),
    )


def _field(loc: tuple) -> str:
    """`("body", "inputs", 0, "choices")` -> `inputs[0].choices`."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _error_response(status: int, message: str, field: str | None, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "field": field}}, status, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before any route sees it.

    Reads the body (at most `limit` + 1 bytes) and replays it to the app, so a chunked body without
    Content-Length is bounded too.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send) -> None:
        response = _error_response(413, f"the request body is over {self.limit} bytes; send fewer inputs per request "
                                        "or raise the server's --max-body-bytes", "body", "request_too_large")
        await response(scope, receive, send)


def create_app(backbone: Backbone, bank: list[BankEntry], config: ServeConfig, run=None) -> FastAPI:
    """The app over a loaded backbone and bank; `run` overrides what the model thread runs (benchmarks)."""
    names = {entry.name: i for i, entry in enumerate(bank)}
    metrics = make_metrics()
    key = config.api_key()
    run = run or partial(run_batch, backbone, bank, config.max_batch)
    state: dict[str, Batcher] = {}

    def observe(rows: int, waits: list[float]) -> None:
        metrics.batch_rows.observe(rows)
        for wait in waits:
            metrics.queue_wait.observe(wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(run, config.max_batch, config.max_wait_ms / 1000, config.max_queue, observe)
        batcher.start()
        metrics.in_flight.set_function(lambda: batcher.pending)
        state["batcher"] = batcher
        yield
        await batcher.drain()  # the server has stopped taking requests: answer those in flight

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def fail(request: Request, error: ApiError) -> JSONResponse:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        metrics.errors.labels(endpoint, error.kind).inc()
        return _error_response(error.status, error.message, error.field, error.kind, error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return fail(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return fail(request, ApiError(400, f"the body is not valid JSON ({first.get('msg')}); send a JSON object",
                                          "body", "invalid_json"))
        field = _field(tuple(first.get("loc", ())))
        content_type = request.headers.get("content-type", "")
        if field == "body" and "json" not in content_type:  # curl -d sends a form unless told otherwise
            return fail(request, ApiError(415, f"the body was sent as {content_type or 'no content type'}; send JSON with "
                                               "`Content-Type: application/json`", "Content-Type", "unsupported_media_type"))
        return fail(request, ApiError(422, f"{field}: {first.get('msg')}", field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return fail(request, ApiError(error.status_code, str(error.detail), None, "http_error", getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):  # a bug: say so, keep serving
        return fail(request, ApiError(500, f"internal error ({type(error).__name__}: {error})", None, "internal_error"))

    async def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {key}".encode()):  # constant time: no key prefix leaks
            raise ApiError(401, "missing or wrong API key; send `Authorization: Bearer <key>`", "Authorization",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    def entry_index(name: object, field: str) -> int:
        if not isinstance(name, str) or name not in names:
            raise ApiError(404, str(UnknownPrompt(name, list(names))), field, "unknown_prompt")
        return names[name]

    async def submit(kind: str, jobs: list, rows: list[int]) -> list:
        batcher = state["batcher"]
        if batcher.pending + len(jobs) > batcher.max_queue:
            raise ApiError(503, f"the server is at its queue limit ({batcher.max_queue} jobs); retry after "
                                f"{RETRY_AFTER_S} s", None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            return await asyncio.gather(*(batcher.submit(kind, job, n) for job, n in zip(jobs, rows)))
        except QueueFull as e:
            raise ApiError(503, str(e), None, "overloaded", {"Retry-After": str(RETRY_AFTER_S)}) from None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "prompts": len(bank) - 1, "in_flight": state["batcher"].pending}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [entry.describe() for entry in bank]}

    @app.post("/v1/classify", dependencies=[Depends(authorize)])
    async def classify(body: ClassifyRequest) -> dict:
        ensemble = isinstance(body.prompt, list)
        members = body.prompt if ensemble else [body.prompt]
        if not members or len(members) != len(set(members)):
            raise ApiError(422, "prompt: an ensemble needs one or more distinct prompt names", "prompt")
        indices = [entry_index(name, f"prompt[{i}]" if ensemble else "prompt") for i, name in enumerate(members)]
        if len(body.inputs) > config.max_inputs:
            raise ApiError(413, f"inputs: {len(body.inputs)} inputs, the limit is {config.max_inputs}; split the request",
                           "inputs", "request_too_large")
        entries = [bank[i] for i in indices]
        examples = [_example(raw, i, entries) for i, raw in enumerate(body.inputs)]
        longest = max(e.num_tokens for e in entries)
        encoded, dropped = zip(*(_encode(backbone, config, ex, i, longest) for i, ex in enumerate(examples)))
        job = ScoreJob([p for p in indices for _ in encoded], [item for _ in indices for item in encoded])
        (logprobs,) = await submit("score", [job], [len(job.items)])
        logprobs = logprobs.view(len(indices), len(encoded), -1)  # [K, E, C]
        results = [_classify_result(examples[e], logprobs[:, e], members, dropped[e], ensemble) for e in range(len(examples))]
        checksum = {m.name: m.checksum for m in entries} if ensemble else entries[0].checksum
        return {"prompt": body.prompt, "checksum": checksum, "results": results}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> dict:
        entry = entry_index(body.model, "model")
        prompts = _prompt_ids(body.prompt)
        if len(prompts) > config.max_inputs:
            raise ApiError(413, f"prompt: {len(prompts)} prompts, the limit is {config.max_inputs}; split the request",
                           "prompt", "request_too_large")
        if body.max_tokens > config.max_tokens:
            raise ApiError(422, f"max_tokens: {body.max_tokens} is over the server's limit {config.max_tokens}", "max_tokens")
        positions = getattr(backbone.model.config.get_text_config(), "max_position_embeddings", None)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        jobs = []
        for i, (ids, _) in enumerate(prompts):
            if positions and bank[entry].num_tokens + len(ids) + body.max_tokens > positions:
                raise ApiError(413, f"prompt[{i}]: {len(ids)} tokens + max_tokens {body.max_tokens} + the prompt's "
                                    f"{bank[entry].num_tokens} is over the model's context of {positions}", f"prompt[{i}]",
                               "input_too_long")
            jobs.append(CompletionJob(entry, ids, body.max_tokens, body.temperature, body.seed, body.logprobs or 0,
                                      body.echo, stop, backbone.tokenizer.eos_token_id))
        done = await submit("complete", jobs, [1] * len(jobs))
        choices = [_choice(i, c, text, body.logprobs is not None) for i, (c, (_, text)) in enumerate(zip(done, prompts))]
        used = sum(len(ids) for ids, _ in prompts)
        new = sum(len(c.ids) - c.num_prompt for c in done)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": used, "completion_tokens": new, "total_tokens": used + new}}

    def _prompt_ids(prompt) -> list[tuple[list[int], str | None]]:
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

    def _choice(index: int, c: Completion, text: str | None, with_logprobs: bool) -> dict:
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

    return app


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
    positions = getattr(backbone.model.config.get_text_config(), "max_position_embeddings", None)
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
    mean = logprobs.mean(0)  # [C]
    # Lester's majority vote; a tie goes to the tied choice with the higher mean log-probability
    tied = votes == votes.max()
    vote = int(torch.where(tied, mean, torch.full_like(mean, float("-inf"))).argmax())
    members_out = [{"prompt": name, **answer(int(lp.argmax())), "logprobs": _finite(lp), "probs": _finite(p)}
                   for name, lp, p in zip(members, logprobs, probs)]
    return {**answer(vote), "votes": votes.tolist(), "mean_logprob": {**answer(int(mean.argmax())), "logprobs": _finite(mean)},
            "members": members_out, **out}
