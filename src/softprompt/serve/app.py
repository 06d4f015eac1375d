"""The HTTP app, assembled: state on `app.state`, middleware, error handlers and the routes.

`schemas` holds the request bodies and the JSON error body, `middleware` the body limit, metrics,
auth and error handlers, `routes` the endpoints; the model thread is the batcher's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from softprompt.backbones.loading import Backbone
from softprompt.serve.bank import BankEntry
from softprompt.serve.batcher import Batcher
from softprompt.serve.config import ServeConfig
from softprompt.serve.engine import run_batch
from softprompt.serve.middleware import BodyLimit, add_error_handlers, count_requests, make_metrics
from softprompt.serve.routes import router


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    batcher = Batcher(state.run, state.config.max_batch, state.config.max_wait_ms / 1000, state.config.max_queue,
                      state.metrics.observe_batch)
    batcher.start()
    state.metrics.in_flight.set_function(lambda: batcher.pending)
    state.batcher = batcher
    yield
    await batcher.drain()  # the server has stopped taking requests: answer those in flight


def create_app(backbone: Backbone, bank: list[BankEntry], config: ServeConfig, run=None) -> FastAPI:
    """The app over a loaded backbone and bank; `run` overrides what the model thread runs (benchmarks)."""
    app = FastAPI(title="softprompt", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.backbone, app.state.bank, app.state.config = backbone, bank, config
    app.state.names = {entry.name: i for i, entry in enumerate(bank)}
    app.state.metrics = make_metrics()
    app.state.api_key = config.api_key()
    app.state.run = run or partial(run_batch, backbone, bank, config.max_batch)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.middleware("http")(count_requests)  # added last, so outermost: it counts the body limit's 413s too
    add_error_handlers(app)
    app.include_router(router)
    return app
