"""`softprompt serve` under load (a bounded soak at concurrency 64), SIGTERM (drain, then exit 0), and as a real process with a key and limits."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import TINY_CONFIGS
from serve_helpers import bank_for, start, write_sources
from factories import model_from_config
from softprompt.backbones.loading import load_backbone
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import TASKS

SRC = Path(__file__).resolve().parents[1] / "src"

VALID = [
    ("/v1/classify", {"prompt": "cb", "inputs": [{"premise": "It rained all day.", "hypothesis": "The ground is wet"}]}),
    ("/v1/classify", {"prompt": "copa", "inputs": [{"premise": "The man fell.", "choice1": "He slipped on ice.",
                                                    "choice2": "He ate lunch.", "question": "cause"}]}),
    ("/v1/classify", {"prompt": "plain", "inputs": [{"text": "Two plus two is", "choices": [" four", " five", " many"]}]}),
    ("/v1/classify", {"prompt": ["cb", "copa", "plain"], "inputs": [{"text": "Sky colour:", "choices": [" blue", " green"]}]}),
    ("/v1/completions", {"model": "copa", "prompt": [[12, 400, 77, 9], [5, 6]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}),
    ("/v1/completions", {"model": "plain", "prompt": "Hello", "max_tokens": 4, "temperature": 0.8, "seed": 3}),
]
BAD = [
    ("/v1/classify", b'{"prompt": "cb", "inputs": [{', 400),
    ("/v1/classify", {"prompt": "missing", "inputs": [{"text": "a", "choices": [" b"]}]}, 404),
    ("/v1/classify", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b", " b"]}]}, 422),
    ("/v1/classify", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b"]}] * 100}, 413),
    ("/v1/completions", {"model": "cb", "prompt": [-1]}, 422),
]


def same(a, b, path="") -> None:
    """JSON answers equal, floats within 1e-5; response ids and timestamps aside."""
    if isinstance(a, dict):
        keys = set(a) - {"id", "created"}
        assert keys == set(b) - {"id", "created"}, path
        for k in keys:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-5, (path, a, b)
    else:
        assert a == b, path


async def post(client: httpx.AsyncClient, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(path, content=body, headers={"content-type": "application/json"})
    return await client.post(path, json=body)


def test_soak_at_concurrency_64_no_5xx_every_valid_request_answered_once_as_unloaded(tokenizer, tmp_path):
    backbone = model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0)
    bank = bank_for(backbone, write_sources(tmp_path))
    plan = [(i, *(VALID[i // 2 % len(VALID)] if i % 2 == 0 else BAD[i // 2 % len(BAD)][:2])) for i in range(256)]

    async def run(url):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            unloaded = [(await post(client, path, body)).json() for path, body in VALID]  # one at a time
            queue: asyncio.Queue = asyncio.Queue()
            for item in plan:
                queue.put_nowait(item)
            answers: list[tuple[int, int, dict]] = []

            async def worker():
                while not queue.empty():
                    i, path, body = queue.get_nowait()
                    response = await post(client, path, body)
                    answers.append((i, response.status_code, response.json()))

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(64))), timeout=240)
            return unloaded, answers

    started = time.perf_counter()
    with start(backbone, bank, max_batch=16, max_wait_ms=5, max_queue=1024) as server:
        unloaded, answers = asyncio.run(run(server.url))
        batches = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                   if line.startswith("softprompt_batch_rows_count")]
    assert time.perf_counter() - started < 240
    assert sorted(i for i, _, _ in answers) == list(range(256))  # every request answered exactly once
    assert [s for _, s, _ in answers if s >= 500] == []
    for i, status, body in answers:
        if i % 2 == 0:
            assert status == 200, body
            same(body, unloaded[i // 2 % len(VALID)])
        else:
            assert status == BAD[i // 2 % len(BAD)][2], body
            assert body["error"]["field"]
    assert float(batches[0].split()[-1]) < 128 + len(VALID)  # requests shared forwards under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(model_dir: Path, prompt: str, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m softprompt.cli serve` on 127.0.0.1 and a free port, once /health answers: (process, url).

    Killed on exit if still running.
    """
    port = free_port()
    command = [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(model_dir), "--device", "cpu",
               "--prompt", prompt, "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def in_process_answer(model_dir: Path, source: Path, raw: dict, max_length: int = 256) -> dict:
    """What `softprompt evaluate` makes of one raw CB input after the prompt in `source`: its label and log-probs."""
    backbone = load_backbone(str(model_dir), "cpu")
    task = TASKS["cb"]
    item = encode(backbone.tokenizer, task.to_example({**raw, "label": task.labels[0]}), max_length)
    logprobs = score(backbone, load_prompt_source(source).prompt, [item], batch_size=1).logprobs[0, 0]  # [C]
    return {"label": task.labels[int(logprobs.argmax())], "logprobs": logprobs.tolist()}


def assert_answers(result: dict, expected: dict) -> None:
    assert result["label"] == expected["label"]
    assert result["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4)


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_model_dir, tmp_path):
    sources = write_sources(tmp_path)
    with serve_process(tiny_model_dir, f"cb={sources['cb']}", "--max-wait-ms", "2000") as (process, url):
        result = {}
        body = {"prompt": "cb", "inputs": [{"premise": "It rained.", "hypothesis": "It is wet"}]}
        request = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/v1/classify", json=body, timeout=60)))
        request.start()
        time.sleep(0.5)  # the request now waits in the batcher (--max-wait-ms 2000)
        process.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert result["r"].status_code == 200, result["r"].text
    assert_answers(result["r"].json()["results"][0], in_process_answer(tiny_model_dir, sources["cb"], body["inputs"][0]))
    assert code == 0, stderr
    assert "drained; exiting" in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_serve_process_with_key_and_limits_answers_401_200_413_and_503(tiny_model_dir, tmp_path):
    """The README's hardened command: --api-key-file --too-long reject --max-body-bytes --max-inputs --max-queue."""
    sources = write_sources(tmp_path)
    (tmp_path / "key").write_text("s3cret\n")
    flags = ["--api-key-file", str(tmp_path / "key"), "--too-long", "reject", "--max-length", "32",
             "--max-body-bytes", "4000", "--max-inputs", "2", "--max-queue", "1"]
    one = {"premise": "It rained all day.", "hypothesis": "The ground is wet"}
    with serve_process(tiny_model_dir, f"cb={sources['cb']}", *flags) as (process, url):
        with httpx.Client(base_url=url, timeout=60) as keyless, \
                httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer s3cret"}) as client:
            assert keyless.get("/health").status_code == 200
            refused = keyless.post("/v1/classify", json={"prompt": "cb", "inputs": [one]})
            answered = client.post("/v1/classify", json={"prompt": "cb", "inputs": [one]})
            too_big = client.post("/v1/classify", json={"prompt": "cb", "inputs": [{"text": "x" * 5000, "choices": [" a"]}]})
            too_long = client.post("/v1/classify", json={"prompt": "cb", "inputs": [{"text": "word " * 40, "choices": [" a"]}]})
            too_many = client.post("/v1/classify", json={"prompt": "cb", "inputs": [one] * 3})
            over_queue = client.post("/v1/completions", json={"model": "cb", "prompt": ["a", "b"], "max_tokens": 1})
        process.terminate()
        assert process.wait(timeout=60) == 0
    assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"
    assert answered.status_code == 200, answered.text
    assert_answers(answered.json()["results"][0], in_process_answer(tiny_model_dir, sources["cb"], one, max_length=32))
    assert too_big.status_code == 413 and "over 4000 bytes" in too_big.json()["error"]["message"]
    assert too_long.status_code == 413 and too_long.json()["error"]["type"] == "input_too_long"
    assert "over the limit of 32" in too_long.json()["error"]["message"]
    assert too_many.status_code == 413 and too_many.json()["error"]["field"] == "inputs"
    assert "the limit is 2" in too_many.json()["error"]["message"]
    assert over_queue.status_code == 503 and over_queue.headers["Retry-After"] == "1"  # 2 jobs, --max-queue 1
