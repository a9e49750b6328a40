"""A real `hetegen serve` process, spoken to with the official `openai` client (and httpx for
what the client hides): greedy output equal to `hetegen run`, streaming, stop strings,
errors in OpenAI's shape, auth, cancellation, the queue, SIGTERM."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from hetegen_cli.cli.app import app
from tests.serve.conftest import Server

PROMPT = "The capital of France is"
MODEL_ID = "tiny-chat"


def client(srv: Server, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key=key, max_retries=0, timeout=60, **kw)


def run_json(model, *args: str) -> dict:
    result = CliRunner().invoke(app, ["run", "--model", str(model), "--prompt", PROMPT, "--json", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --- the routes --------------------------------------------------------------------------


def test_health_and_models(server):
    health = httpx.get(f"{server.base}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client(server).models.retrieve(MODEL_ID).id == MODEL_ID


def test_greedy_completion_equals_hetegen_run(server, chat_model):
    want = run_json(chat_model, "-n", "12")
    got = client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want["text"]
    assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.choices[0].finish_reason == ("stop" if want["stop_reason"] == "eos" else "length")
    timings = got.model_extra["hetegen"]
    assert timings["decode_tokens_per_s"] > 0 and timings["time_to_first_token_s"] > 0


def test_greedy_chat_equals_hetegen_run_chat(server, chat_model):
    want = run_json(chat_model, "--chat", "-n", "10")
    got = client(server).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0
    )
    assert got.choices[0].message.content == want["text"] and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streaming_gives_the_same_text_and_usage(server):
    c = client(server)
    whole = c.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    chunks = list(
        c.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
    pieces = list(
        c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    )
    plain = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_stop_strings_cut_the_text(server):
    c = client(server)
    full = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    assert len(full) >= 4
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a string the greedy text contains
    cut = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(p.choices[0].text for p in streamed) == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    kw = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, status, param",
    [
        ({"model": "gpt-4"}, 404, "model"),
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 10_000}, 400, "max_tokens"),
        ({"n": 2}, 400, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "word " * 1200}, 400, "prompt"),
        ({"logprobs": 2}, 400, "logprobs"),
        ({"seed": -1}, 400, "seed"),
    ],
)
def test_bad_requests_get_openai_errors(server, extra, status, param):
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4, **extra}
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


def test_malformed_bodies_and_routes(server):
    for raw, headers in (
        ("{bad", {"content-type": "application/json"}),
        ("[1, 2]", {"content-type": "application/json"}),
    ):
        r = httpx.post(f"{server.v1}/chat/completions", content=raw, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(f"{server.v1}/chat/completions", json={"model": MODEL_ID, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400
    r = httpx.get(f"{server.v1}/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nowhere"
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "word " * 1200}], max_tokens=4
        )


def test_metrics_are_prometheus_text(server):
    client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(f"{server.base}/metrics").text
    for name in (
        "hetegen_requests_total",
        "hetegen_completion_tokens_total",
        "hetegen_queue_length",
        "hetegen_decode_tokens_per_second",
        "hetegen_request_seconds_bucket",
    ):
        assert name in text
    assert 'hetegen_requests_total{route="/v1/completions",status="200"}' in text


# --- one at a time: cancellation and the queue -------------------------------------------


def _metric(srv: Server, name: str) -> float:
    for line in httpx.get(f"{srv.base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_that_leaves_cancels_its_generation(server):
    before = _metric(server, "hetegen_cancelled_total")
    with httpx.stream(
        "POST",
        f"{server.v1}/completions",
        json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the connection is closed: the generation stops at its next token and frees the model
    deadline = time.monotonic() + 20
    while _metric(server, "hetegen_cancelled_total") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "hetegen_cancelled_total") > before
    start = time.monotonic()
    client(server).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, temperature=0)
    assert time.monotonic() - start < 20


def test_a_full_queue_answers_429_with_retry_after(chat_model, server_home):
    srv = Server(["--model", str(chat_model), "--max-queue", "1", "--context", "4096"], server_home)
    try:
        results: list[httpx.Response] = []

        def call() -> None:
            body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0}
            results.append(httpx.post(f"{srv.v1}/completions", json=body, timeout=120))

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):  # the client maps it too
            pending = [threading.Thread(target=call) for _ in range(3)]
            for t in pending:
                t.start()
            time.sleep(0.5)
            client(srv).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2)
        for t in pending:
            t.join()
    finally:
        assert srv.stop() == 0, srv.stderr()


def test_load_every_request_completes_or_gets_429(chat_model, server_home):
    """40 concurrent clients, a few tokens each: none is lost, the server stays up."""
    srv = Server(["--model", str(chat_model), "--max-queue", "8", "--context", "256"], server_home)
    try:
        outcomes: list[object] = []

        def call(i: int) -> None:
            try:
                r = client(srv).chat.completions.create(
                    model=MODEL_ID,
                    messages=[{"role": "user", "content": f"{PROMPT} {i}"}],
                    max_tokens=4,
                    temperature=0,
                )
                outcomes.append(r.usage.completion_tokens)
            except openai.RateLimitError:
                outcomes.append(429)
            except Exception as exc:  # anything else is a lost request
                outcomes.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outcomes) == 40
        lost = [o for o in outcomes if isinstance(o, Exception)]
        assert not lost, lost
        assert any(o != 429 for o in outcomes)
        assert httpx.get(f"{srv.base}/health").json()["status"] == "ok"
        assert _metric(srv, "hetegen_queue_length") == 0 and _metric(srv, "hetegen_running") == 0
    finally:
        assert srv.stop() == 0, srv.stderr()


# --- auth and shutdown -------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(chat_model, server_home):
    srv = Server(["--model", str(chat_model), "--api-key", "s3cret", "--context", "256"], server_home)
    try:
        assert httpx.get(f"{srv.base}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{srv.base}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").models.list()
        ok = client(srv, key="s3cret").completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2)
        assert ok.usage.completion_tokens >= 1
    finally:
        assert srv.stop() == 0


def test_sigterm_stops_in_flight_generation_and_exits_0(chat_model, server_home):
    srv = Server(["--model", str(chat_model), "--grace", "2", "--context", "4096"], server_home)
    result: list[httpx.Response] = []

    def call() -> None:
        body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0}
        result.append(httpx.post(f"{srv.v1}/completions", json=body, timeout=60))

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 20
    while not httpx.get(f"{srv.base}/health").json()["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    assert srv.stop() == 0, srv.stderr()
    assert time.monotonic() - start < 15
    t.join()
    assert result[0].status_code == 503 and result[0].json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in srv.stderr() and "server stopped" in srv.stderr()


@pytest.mark.slow
def test_default_model_chat_equals_hetegen_run(server_home):
    """SmolLM2-135M-Instruct (the default model, with its own chat template)."""
    from hetegen_cli.core.errors import ModelError
    from hetegen_cli.models.loading.source import resolve_model

    try:
        resolve_model(None, need_weights=True)
    except ModelError as exc:
        pytest.skip(f"default model unavailable: {exc.message}")
    question = "What is the capital of France?"
    result = CliRunner().invoke(app, ["run", "--prompt", question, "--chat", "-n", "16", "--json"])
    assert result.exit_code == 0, result.stderr
    want = json.loads(result.stdout)
    srv = Server(["--context", "1024"], server_home)
    try:
        got = client(srv).chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
        )
        assert got.choices[0].message.content == want["text"]
        assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
        streamed = client(srv).chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want["text"]
    finally:
        assert srv.stop() == 0, srv.stderr()


def test_serving_a_plan_runs_the_engine_within_its_context(chat_model, server_home, tmp_path):
    from tests.fakes import make_profile

    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(make_profile(gpu=False, threads=1, best="float32", cpu_dtypes={"float32": 50e9}))
    )
    plan = tmp_path / "plan.json"
    made = CliRunner().invoke(
        app,
        [
            "plan",
            "--model",
            str(chat_model),
            "--profile",
            str(profile),
            "--prompt-len",
            "100",
            "--max-new-tokens",
            "28",
            "--output",
            str(plan),
        ],
    )
    assert made.exit_code == 0, made.stderr
    want = run_json(chat_model, "--plan", str(plan), "-n", "8")
    assert want["engine"] == "hetegen"
    refused = CliRunner().invoke(
        app, ["serve", "--model", str(chat_model), "--plan", str(plan), "--context", "1000"]
    )
    assert refused.exit_code == 2 and "exceeds the plan's 128 tokens" in refused.stderr
    srv = Server(["--model", str(chat_model), "--plan", str(plan)], server_home)
    try:
        card = httpx.get(f"{srv.v1}/models").json()["data"][0]
        assert card["hetegen"]["engine"] == "hetegen" and card["hetegen"]["context"] == 128
        got = client(srv).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.choices[0].text == want["text"]
    finally:
        assert srv.stop() == 0, srv.stderr()
