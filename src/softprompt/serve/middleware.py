"""What every request passes through: the body limit, Prometheus metrics, API-key auth and JSON errors.

Each piece reads what it needs from `app.state` (`metrics`, `api_key`), set by `create_app`.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.serve.schemas import ApiError, error_response, field_path

ENDPOINTS = ("/v1/classify", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    errors: Counter
    batch_rows: Histogram
    queue_wait: Histogram
    latency: Histogram
    in_flight: Gauge

    def observe_batch(self, rows: int, waits: list[float]) -> None:
        """The batcher's report of one forward: its rows and each job's wait in the queue."""
        self.batch_rows.observe(rows)
        for wait in waits:
            self.queue_wait.observe(wait)


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


def _endpoint(request: Request) -> str:
    return request.url.path if request.url.path in ENDPOINTS else "other"  # bounded label values


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
        response = error_response(413, f"the request body is over {self.limit} bytes; send fewer inputs per request "
                                       "or raise the server's --max-body-bytes", "body", "request_too_large")
        await response(scope, receive, send)


async def count_requests(request: Request, call_next):
    """HTTP middleware: count every answer by endpoint and status, and time it."""
    metrics: Metrics = request.app.state.metrics
    started = time.perf_counter()
    response = await call_next(request)
    metrics.requests.labels(_endpoint(request), str(response.status_code)).inc()
    metrics.latency.labels(_endpoint(request)).observe(time.perf_counter() - started)
    return response


async def authorize(request: Request) -> None:
    """Route dependency: with an API key set, the request must send `Authorization: Bearer <key>`.

    Raises:
        ApiError: 401 with `WWW-Authenticate: Bearer`.
    """
    key: str | None = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {key}".encode()):  # constant time: no key prefix leaks
        raise ApiError(401, "missing or wrong API key; send `Authorization: Bearer <key>`", "Authorization",
                       "authentication_error", {"WWW-Authenticate": "Bearer"})


def _fail(request: Request, error: ApiError) -> JSONResponse:
    request.app.state.metrics.errors.labels(_endpoint(request), error.kind).inc()
    return error_response(error.status, error.message, error.field, error.kind, error.headers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _fail(request, error)


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return _fail(request, ApiError(400, f"the body is not valid JSON ({first.get('msg')}); send a JSON object",
                                       "body", "invalid_json"))
    field = field_path(tuple(first.get("loc", ())))
    content_type = request.headers.get("content-type", "")
    if field == "body" and "json" not in content_type:  # curl -d sends a form unless told otherwise
        return _fail(request, ApiError(415, f"the body was sent as {content_type or 'no content type'}; send JSON with "
                                            "`Content-Type: application/json`", "Content-Type", "unsupported_media_type"))
    return _fail(request, ApiError(422, f"{field}: {first.get('msg')}", field))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _fail(request, ApiError(error.status_code, str(error.detail), None, "http_error", getattr(error, "headers", None)))


async def _internal(request: Request, error: Exception) -> JSONResponse:  # a bug: say so, keep serving
    return _fail(request, ApiError(500, f"internal error ({type(error).__name__}: {error})", None, "internal_error"))


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, pydantic's, Starlette's or a bug, as the JSON error body, counted by type."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
