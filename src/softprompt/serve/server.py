"""Running the app on uvicorn: the `serve` command (SIGTERM drains, then exits 0) and a server in a thread."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from softprompt.backbones.loading import load_backbone
from softprompt.serve.app import create_app
from softprompt.serve.bank import load_bank, parse_prompt_spec
from softprompt.serve.config import ServeConfig

LOOPBACK_WARNING = ("warning: binding {host}, which other machines may reach, without --api-key-file: anyone who "
                    "can connect can use this server; give --api-key-file FILE or bind 127.0.0.1")


def serve(fields: dict, prompt_specs: list[str], echo: Callable[[str], None] = print) -> None:
    """Load the backbone and every prompt once, then answer HTTP until SIGTERM or Ctrl-C.

    SIGTERM stops taking connections, answers the requests in flight (up to `drain_timeout_s`),
    stops the model thread and returns, so the process exits 0.

    Raises:
        ValueError, FileNotFoundError, OSError: a bad flag, prompt or model (the message names it).
    """
    config = ServeConfig(**fields)
    if not config.binds_loopback() and config.api_key_file is None:
        echo(LOOPBACK_WARNING.format(host=config.host))
    config.api_key()  # an unreadable key file fails before the model loads
    sources = [parse_prompt_spec(spec) for spec in prompt_specs]
    for name, path in sources:
        if not path.exists():  # before the model loads, which takes seconds
            raise FileNotFoundError(f"--prompt {name}={path}: no such run folder, adapter or prompt file")
    backbone = load_backbone(config.model, config.device, config.dtype, config.attention).scoring()  # serving never trains
    bank = load_bank(backbone, sources)
    hardware = backbone.hardware()
    echo(f"backbone {backbone.name}: {hardware['dtype']} weights, {hardware['attention']} attention on {hardware['model']}")
    for entry in bank[1:]:
        echo(f"prompt {entry.name}: task {entry.task}, {entry.num_tokens} tokens, sha256 {entry.checksum[:12]}, {entry.source}")
    app = create_app(backbone, bank, config)
    server = uvicorn.Server(_uvicorn_config(app, config))
    # uvicorn re-raises the SIGTERM it caught once it has shut down; this handler takes it, so the exit is 0
    signal.signal(signal.SIGTERM, lambda sig, frame: echo("drained; exiting"))
    server.run()


def _uvicorn_config(app: FastAPI, config: ServeConfig) -> uvicorn.Config:
    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=config.drain_timeout_s, lifespan="on")


class ServerThread:
    """The app on uvicorn in a background thread, on `config.port` (0: a free port); a context manager.

    Tests and benchmarks use it to talk to the real HTTP stack on 127.0.0.1.
    """

    def __init__(self, app: FastAPI, config: ServeConfig) -> None:
        self.server = uvicorn.Server(_uvicorn_config(app, config))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start (port taken?)")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

