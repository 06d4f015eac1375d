"""`softprompt serve` through the real HTTP stack: uvicorn on 127.0.0.1, a free port, httpx clients."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CONFIGS
from serve_helpers import PROMPT_LENGTHS, bank_for, start, write_sources
from factories import model_from_config
from softprompt.cli import app as cli
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.io.runs import PromptFileError, save_prompt, tensor_sha256
from softprompt.io.sources import load_prompt_source
from softprompt.tasks.registry import TASKS, Example, load_examples
from test_evaluate import full_logits


@pytest.fixture(scope="module")
def backbone(tokenizer):
    return model_from_config(TINY_CONFIGS["llama"], tokenizer, seed=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("bank"))


@pytest.fixture(scope="module")
def bank(backbone, sources):
    return bank_for(backbone, sources)


@pytest.fixture(scope="module")
def server(backbone, bank):
    with start(backbone, bank, max_batch=64, max_wait_ms=50) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def rows(task: str, n: int, data_dir) -> list[dict]:
    path = data_dir / TASKS[task].folder / "val.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def text_inputs(task: str, n: int, data_dir) -> list[dict]:
    return [{"text": e.text, "choices": list(e.choices)} for e in load_examples(TASKS[task], "val", data_dir)[:n]]


def expected_logprobs(backbone, prompt, examples: list[Example], max_length: int = 256) -> torch.Tensor:
    """What `softprompt evaluate` computes: `score()` on `encode(..., max_length)`: `[E, C]`."""
    items = [encode(backbone.tokenizer, e, max_length) for e in examples]
    return score(backbone, prompt, items, batch_size=32).logprobs[0]


def prompt_of(sources, name):
    return load_prompt_source(sources[name]).prompt


def test_models_lists_the_bank_with_tasks_lengths_and_checksums(client, sources):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["random-llama", "cb", "copa", "plain"]  # the bare backbone first
    assert [m["num_tokens"] for m in data] == [0, *PROMPT_LENGTHS.values()]
    assert [m["task"] for m in data] == [None, "cb", "copa", None]  # a PEFT adapter carries no task
    assert data[1]["checksum"] == tensor_sha256(prompt_of(sources, "cb"))
    assert client.get("/health").json()["status"] == "ok"


def test_mixed_batch_of_three_prompt_lengths_equals_evaluate(server, backbone, sources, data_dir):
    """Concurrent requests for prompts of lengths 2, 5 and 9 share forwards and match `score()` per prompt."""
    requests = {
        "cb": {"prompt": "cb", "inputs": rows("cb", 4, data_dir)},  # raw fields, the task's template
        "copa": {"prompt": "copa", "inputs": rows("copa", 4, data_dir)},  # multi-token choices: continuation rows
        "plain": {"prompt": "plain", "inputs": text_inputs("rte", 4, data_dir)},  # text + choices
    }

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/classify", json=body) for body in requests.values()))

    before = _metric(server, "softprompt_batch_rows_count")
    answers = dict(zip(requests, asyncio.run(send_all())))
    batches = _metric(server, "softprompt_batch_rows_count") - before
    assert batches < 3  # within --max-wait-ms the three requests were coalesced
    for name, response in answers.items():
        assert response.status_code == 200, response.text
        task = "rte" if name == "plain" else name
        examples = load_examples(TASKS[task], "val", data_dir)[:4]
        expected = expected_logprobs(backbone, prompt_of(sources, name), examples)
        results = response.json()["results"]
        for e, result in enumerate(results):
            n = len(examples[e].choices)
            assert result["logprobs"] == pytest.approx(expected[e, :n].tolist(), abs=1e-5)
            assert result["choice"] == int(expected[e, :n].argmax())
        if name == "cb":
            assert [r["label"] for r in results] == [TASKS["cb"].labels[r["choice"]] for r in results]
        assert response.json()["checksum"] == tensor_sha256(prompt_of(sources, name))


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_ensemble_is_majority_vote_and_mean_log_probability(client, data_dir):
    inputs = text_inputs("cb", 3, data_dir)
    single = {n: client.post("/v1/classify", json={"prompt": n, "inputs": inputs}).json()["results"] for n in PROMPT_LENGTHS}
    response = client.post("/v1/classify", json={"prompt": list(PROMPT_LENGTHS), "inputs": inputs}).json()
    assert set(response["checksum"]) == set(PROMPT_LENGTHS)
    for e, result in enumerate(response["results"]):
        members = [single[n][e] for n in PROMPT_LENGTHS]
        torch.testing.assert_close(torch.tensor([m["logprobs"] for m in result["members"]]),
                                   torch.tensor([m["logprobs"] for m in members]), atol=1e-5, rtol=0)
        assert result["votes"] == [sum(m["choice"] == c for m in members) for c in range(3)]


# [K=4 prompts, E=2 inputs, C=3 choices] of log-likelihoods, made by hand
HAND_MADE = torch.tensor([
    [[-0.1, -2.0, -5.0], [-1.0, -1.1, -9.0]],  # votes: choice 0, choice 0
    [[-0.2, -3.0, -5.0], [-1.0, -1.1, -9.0]],  # 0, 0
    [[-4.0, -0.1, -5.0], [-1.0, -1.1, -9.0]],  # 1, 0
    [[-3.0, -0.5, -5.0], [-9.0, -0.1, -9.0]],  # 1, 1
])


def test_ensemble_tie_goes_to_the_higher_mean_and_the_vote_can_differ_from_the_mean(backbone, bank):
    """Input 0: votes 2-2 between choices 0 and 1; means -1.825 and -1.4, so choice 1 wins the tie.
    Input 1: votes 3-1 for choice 0; means -3.0 and -0.85, so the vote says 0 and the mean says 1."""
    fixed = lambda kind, jobs: [HAND_MADE.reshape(8, 3)]  # noqa: E731  [K*E, C], prompt-major as the route sends
    inputs = [{"text": "Pick one.", "choices": [" yes", " no", " maybe"]}] * 2
    body = {"prompt": ["random-llama", "cb", "copa", "plain"], "inputs": inputs}
    with start(backbone, bank, run=fixed) as server:
        results = httpx.post(f"{server.url}/v1/classify", json=body).json()["results"]
    assert [r["votes"] for r in results] == [[2, 2, 0], [3, 1, 0]]
    assert [r["choice"] for r in results] == [1, 0]
    assert [r["text"] for r in results] == [" no", " yes"]
    assert [r["mean_logprob"]["choice"] for r in results] == [1, 1]
    assert results[0]["mean_logprob"]["logprobs"] == pytest.approx([-1.825, -1.4, -5.0])
    assert [m["choice"] for m in results[0]["members"]] == [0, 0, 1, 1]


BAD_CLASSIFY = [
    ("malformed-json", b'{"prompt": "cb", "inputs": [', 400, "body"),
    ("not-an-object", b"[1, 2]", 422, "body"),
    ("unknown-prompt", {"prompt": "nope", "inputs": [{"text": "a", "choices": [" b"]}]}, 404, "prompt"),
    ("unknown-in-ensemble", {"prompt": ["cb", "nope"], "inputs": [{"text": "a", "choices": [" b"]}]}, 404, "prompt[1]"),
    ("no-inputs", {"prompt": "cb", "inputs": []}, 422, "inputs"),
    ("empty-choices", {"prompt": "cb", "inputs": [{"text": "a", "choices": []}]}, 422, "inputs[0].choices"),
    ("duplicate-choices", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b", " b"]}]}, 422, "inputs[0].choices"),
    ("choice-without-tokens", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b", ""]}]}, 422, "inputs[0].choices"),
    ("choice-not-text", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b", 3]}]}, 422, "inputs[0].choices[1]"),
    ("missing-task-field", {"prompt": "cb", "inputs": [{"premise": "a"}]}, 422, "inputs[0].hypothesis"),
    ("task-field-wrong-type", {"prompt": "cb", "inputs": [{"premise": 1, "hypothesis": "b"}]}, 422, "inputs[0].premise"),
    ("raw-fields-no-task", {"prompt": "plain", "inputs": [{"premise": "a", "hypothesis": "b"}]}, 422, "inputs[0]"),
    ("wsc-fields-on-a-text-prompt", {"prompt": "plain", "inputs": [{"text": "a", "target": {}}]}, 422, "inputs[0].choices"),
    ("raw-fields-two-tasks", {"prompt": ["cb", "copa"], "inputs": [{"premise": "a", "hypothesis": "b"}]}, 422, "inputs[0]"),
    ("bad-copa-question", {"prompt": "copa", "inputs": [{"premise": "a", "choice1": "b", "choice2": "c", "question": "why"}]}, 422, "inputs[0]"),
    ("too-many-inputs", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b"]}] * 65}, 413, "inputs"),
    ("extra-field", {"prompt": "cb", "inputs": [{"text": "a", "choices": [" b"]}], "temperature": 1}, 422, "temperature"),
]


@pytest.mark.parametrize("body, status, field", [b[1:] for b in BAD_CLASSIFY], ids=[b[0] for b in BAD_CLASSIFY])
def test_bad_classify_requests_are_4xx_json_naming_the_field(client, body, status, field):
    if isinstance(body, bytes):
        response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/classify", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert field.split("[")[0] in error["message"] or error["field"] == "body"


def test_a_body_not_sent_as_json_is_415_saying_how(client):
    response = client.post("/v1/classify", content=b'{"prompt": "cb"}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415 and response.json()["error"]["field"] == "Content-Type"
    assert "application/json" in response.json()["error"]["message"]


def test_unknown_prompt_lists_the_valid_names(client):
    response = client.post("/v1/classify", json={"prompt": "nope", "inputs": [{"text": "a", "choices": [" b"]}]})
    assert response.json()["error"]["message"] == "unknown prompt 'nope'; this server holds: random-llama, cb, copa, plain"


def test_long_input_is_truncated_as_evaluate_does_and_says_so(backbone, bank, sources):
    example = Example("word " * 60 + "end?", (" yes", " no"), 0)
    body = {"prompt": "cb", "inputs": [{"text": example.text, "choices": list(example.choices)}]}
    with start(backbone, bank, max_length=20) as server:
        result = httpx.post(f"{server.url}/v1/classify", json=body).json()["results"][0]
    full = len(backbone.tokenizer(example.text)["input_ids"])
    assert result["truncated"] and result["dropped_tokens"] == full - (20 - 1)
    expected = expected_logprobs(backbone, prompt_of(sources, "cb"), [example], max_length=20)[0]
    assert result["logprobs"] == pytest.approx(expected.tolist(), abs=1e-5)
    with start(backbone, bank, max_length=20, too_long="reject") as server:
        response = httpx.post(f"{server.url}/v1/classify", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "inputs[0]" and "over the limit of 20" in response.json()["error"]["message"]


def test_body_over_the_limit_is_413_with_or_without_content_length(backbone, bank):
    big = json.dumps({"prompt": "cb", "inputs": [{"text": "x" * 3000, "choices": [" a"]}]}).encode()
    with start(backbone, bank, max_body_bytes=2000) as server:
        declared = httpx.post(f"{server.url}/v1/classify", content=big, headers={"content-type": "application/json"})
        chunked = httpx.post(f"{server.url}/v1/classify", content=iter([big[:1500], big[1500:]]),
                             headers={"content-type": "application/json"})
        small = httpx.post(f"{server.url}/v1/classify", json={"prompt": "cb", "inputs": [{"text": "x", "choices": [" a"]}]})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["field"] == "body" and "2000 bytes" in response.json()["error"]["message"]
    assert small.status_code == 200


def test_queue_limit_answers_503_with_retry_after_not_a_hang(backbone, bank):
    body = {"prompt": "cb", "inputs": [{"text": "a b c", "choices": [" d"]}]}

    async def overload(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            held = [asyncio.create_task(c.post("/v1/classify", json=body)) for _ in range(2)]
            await asyncio.sleep(0.3)  # both are waiting in the batcher (--max-wait-ms 1500)
            refused = await c.post("/v1/classify", json=body)
            return refused, await asyncio.gather(*held)

    with start(backbone, bank, max_queue=2, max_wait_ms=1500, max_batch=64) as server:
        refused, held = asyncio.run(overload(server.url))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert [r.status_code for r in held] == [200, 200]


def test_api_key_guards_every_endpoint_but_health(backbone, bank, tmp_path):
    (tmp_path / "key").write_text("s3cret-key\n")
    with start(backbone, bank, api_key_file=str(tmp_path / "key")) as server:
        url = server.url
        assert httpx.get(f"{url}/health").status_code == 200
        for auth in (None, "Bearer wrong", "Bearer s3cret-ke", "s3cret-key"):
            headers = {"Authorization": auth} if auth else {}
            for path in ("/v1/models", "/metrics"):
                response = httpx.get(url + path, headers=headers)
                assert response.status_code == 401, (path, auth)
                assert response.headers["WWW-Authenticate"] == "Bearer"
            response = httpx.post(f"{url}/v1/completions", json={"model": "cb", "prompt": "a"}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["field"] == "Authorization"
        good = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(f"{url}/v1/models", headers=good).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"model": "cb", "prompt": "a", "max_tokens": 1}, headers=good).status_code == 200


def test_non_loopback_bind_without_a_key_warns(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--prompt", f"x={tmp_path / 'missing'}"])
    assert "warning: binding 0.0.0.0" in result.output and "--api-key-file" in result.output
    assert result.exit_code == 2  # then the missing prompt stops it, before anything binds
    quiet = CliRunner().invoke(cli, ["serve", "--prompt", f"x={tmp_path / 'missing'}"])
    assert "warning" not in quiet.output


@pytest.mark.parametrize("flag, message", [
    (["--prompt", "noequals"], "must be NAME=RUN_DIR_OR_PEFT_ADAPTER"),
    (["--prompt", "bad name=x"], "--prompt name 'bad name'"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--too-long", "drop"], "'drop' is not one of"),
], ids=["no-equals", "bad-name", "max-batch", "too-long"])
def test_serve_flags_are_checked_with_messages(flag, message):
    result = CliRunner().invoke(cli, ["serve", *flag])
    assert result.exit_code == 2 and message in result.output


# --- /v1/completions ---------------------------------------------------------------------------


def lm_eval_parse_logprobs(outputs: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-evaluation-harness 0.4.13's LocalCompletionsAPI.parse_logprobs (lm_eval/models/openai_completions.py)."""
    res = []
    for choice, ctxlen in zip(sorted(outputs["choices"], key=lambda c: c["index"]), ctxlens):
        assert ctxlen > 0
        logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        is_greedy = all(tok == max(top.values()) for tok, top in zip(
            choice["logprobs"]["token_logprobs"][ctxlen:-1], choice["logprobs"]["top_logprobs"][ctxlen:-1]))
        res.append((logprobs, is_greedy))
    return res


def test_completions_echo_logprobs_give_lm_eval_the_scores_evaluate_computes(client, backbone, sources, data_dir):
    examples = load_examples(TASKS["copa"], "val", data_dir)[:3]
    items = [encode(backbone.tokenizer, e, 256) for e in examples]
    pairs = [(item.context, choice) for item in items for choice in item.choices]
    # lm-eval's loglikelihood payload: token ids, echo, one logprob, one new token
    payload = {"model": "copa", "prompt": [c + x for c, x in pairs], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == 200, response.text
    parsed = lm_eval_parse_logprobs(response.json(), [len(c) for c, _ in pairs])
    scores = score(backbone, prompt_of(sources, "copa"), items, batch_size=8)
    expected = [float(scores.logprobs[0, e, c]) for e, item in enumerate(items) for c in range(len(item.choices))]
    assert [lp for lp, _ in parsed] == pytest.approx(expected, abs=1e-5)
    greedy = {(e, item.label): bool(scores.exact[0, e]) for e, item in enumerate(items)}
    for k, (e, c) in enumerate((e, c) for e, item in enumerate(items) for c in range(len(item.choices))):
        if (e, c) in greedy:
            assert parsed[k][1] == greedy[(e, c)]
    choice = response.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == len(payload["prompt"][0]) + 1  # the prompt, then one new token
    assert choice["logprobs"]["token_logprobs"][0] is None


def test_greedy_completion_equals_argmax_of_full_forwards(client, backbone, sources):
    ids = backbone.tokenizer("The weather today is")["input_ids"]
    prompt = prompt_of(sources, "plain")
    generated = list(ids)
    for _ in range(5):
        generated.append(int(full_logits(backbone.model, prompt, generated)[-1].argmax()))
    body = {"model": "plain", "prompt": "The weather today is", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == backbone.tokenizer.decode(generated[len(ids):])
    logprobs = torch.log_softmax(full_logits(backbone.model, prompt, generated)[len(ids) - 1 : -1], -1)
    expected = [float(logprobs[j, t]) for j, t in enumerate(generated[len(ids):])]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    assert choice["finish_reason"] == "length"


def test_bare_backbone_and_seeded_sampling_and_stop(client, backbone):
    base = {"model": "random-llama", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0}
    first = client.post("/v1/completions", json={**base, "seed": 7}).json()["choices"][0]["text"]
    again = client.post("/v1/completions", json={**base, "seed": 7}).json()["choices"][0]["text"]
    other = [client.post("/v1/completions", json={**base, "seed": s}).json()["choices"][0]["text"] for s in (8, 9, 10)]
    assert first == again and any(o != first for o in other)
    ids = backbone.tokenizer("Once upon a time")["input_ids"]
    greedy = list(ids)
    for _ in range(3):
        greedy.append(int(full_logits(backbone.model, None, greedy)[-1].argmax()))
    stop = backbone.tokenizer.decode(greedy[-1:])
    cut = client.post("/v1/completions", json={**base, "temperature": 0, "stop": [stop]}).json()["choices"][0]
    full_text = backbone.tokenizer.decode(greedy[len(ids):])
    assert cut["finish_reason"] == "stop" and cut["text"] == full_text[: full_text.find(stop)]


BAD_COMPLETIONS = [
    ("unknown-model", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("token-out-of-vocab", {"model": "cb", "prompt": [5, 10**9]}, 422, "prompt[0]"),
    ("empty-prompt", {"model": "cb", "prompt": ""}, 422, "prompt[0]"),
    ("negative-max-tokens", {"model": "cb", "prompt": "a", "max_tokens": -1}, 422, "max_tokens"),
    ("max-tokens-over-limit", {"model": "cb", "prompt": "a", "max_tokens": 10_000}, 422, "max_tokens"),
    ("over-context", {"model": "cb", "prompt": [5] * 500, "max_tokens": 100}, 413, "prompt[0]"),
    ("n-not-1", {"model": "cb", "prompt": "a", "n": 2}, 422, "n"),
    ("stream", {"model": "cb", "prompt": "a", "stream": True}, 422, "stream"),
]


@pytest.mark.parametrize("body, status, field", [b[1:] for b in BAD_COMPLETIONS], ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests_are_4xx_naming_the_field(client, body, status, field):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def samples(metrics_text: str) -> dict[str, float]:
    """Prometheus text as `{'name{labels}': value}`."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_requests_errors_batches_and_latency(backbone, bank):
    """On a fresh server: 2 good classify requests (1 and 3 inputs), 1 unknown prompt, 1 empty inputs, 1 health, 1 bad path."""
    one = {"text": "a b c", "choices": [" d", " e"]}
    with start(backbone, bank) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/classify", json={"prompt": "cb", "inputs": [one]}).status_code == 200
        assert c.post("/v1/classify", json={"prompt": "copa", "inputs": [one] * 3}).status_code == 200
        assert c.post("/v1/classify", json={"prompt": "nope", "inputs": [one]}).status_code == 404
        assert c.post("/v1/classify", json={"prompt": "cb", "inputs": []}).status_code == 422
        assert c.get("/health").status_code == 200
        assert c.get("/nowhere").status_code == 404
        counts = samples(c.get("/metrics").text)
    assert counts['softprompt_requests_total{endpoint="/v1/classify",status="200"}'] == 2
    assert counts['softprompt_requests_total{endpoint="/v1/classify",status="404"}'] == 1
    assert counts['softprompt_requests_total{endpoint="/v1/classify",status="422"}'] == 1
    assert counts['softprompt_requests_total{endpoint="/health",status="200"}'] == 1
    assert counts['softprompt_requests_total{endpoint="other",status="404"}'] == 1
    assert 'softprompt_requests_total{endpoint="/metrics",status="200"}' not in counts  # counted once answered
    assert counts['softprompt_errors_total{endpoint="/v1/classify",type="unknown_prompt"}'] == 1
    assert counts['softprompt_errors_total{endpoint="/v1/classify",type="invalid_request_error"}'] == 1
    assert counts['softprompt_errors_total{endpoint="other",type="http_error"}'] == 1
    assert counts["softprompt_batch_rows_count"] == 2 and counts["softprompt_batch_rows_sum"] == 1 + 3  # one batch each
    assert counts["softprompt_queue_wait_seconds_count"] == 2
    assert counts['softprompt_request_latency_seconds_count{endpoint="/v1/classify"}'] == 4
    assert counts["softprompt_jobs_in_flight"] == 0


def test_bank_refuses_pickles_altered_files_and_duplicate_names(backbone, sources, tmp_path):
    torch.save({"prompt": torch.zeros(2, 16)}, tmp_path / "prompt.pt")
    with pytest.raises(PromptFileError, match="refusing a pickle-based file"):
        bank_for(backbone, {"x": tmp_path / "prompt.pt"})
    altered = tmp_path / "altered.safetensors"
    save_prompt(altered, torch.ones(2, 16))
    data = bytearray(altered.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"[::-1]  # the last float changes; the header's checksum does not
    altered.write_bytes(bytes(data))
    with pytest.raises(PromptFileError, match="checksum mismatch"):
        bank_for(backbone, {"x": altered})
    with pytest.raises(ValueError, match="--prompt name 'random-llama' is given twice"):
        bank_for(backbone, {"random-llama": sources["cb"]})
    with pytest.raises(PromptFileError, match="hidden size 16"):
        bank_for(model_from_config({**TINY_CONFIGS["llama"], "hidden_size": 32}, backbone.tokenizer), {"x": sources["copa"]})
