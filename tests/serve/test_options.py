"""`hetegen serve` options and request schemas, checked without a server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hetegen_cli.cli.app import app
from hetegen_cli.core.errors import UsageError
from hetegen_cli.run.setup import ModelSetup
from hetegen_cli.serve import protocol as p
from hetegen_cli.serve.model import ServeOptions
from hetegen_cli.serve.server import bind, is_loopback


@pytest.mark.parametrize(
    "kw, text",
    [
        ({"port": 70000}, "--port"),
        ({"max_queue": -1}, "--max-queue"),
        ({"default_max_tokens": 0}, "--max-tokens"),
        ({"context": 0}, "--context"),
        ({"grace_s": -1}, "--grace"),
        ({"setup": {"plan_path": "p.json", "gpu_budget_bytes": 1}}, "--plan and --gpu-memory"),
        ({"setup": {"device": "cpu", "gpu_budget_bytes": 1}}, "no effect with --device cpu"),
        ({"api_key": " "}, "--api-key"),
    ],
)
def test_bad_options_are_usage_errors(kw, text):
    with pytest.raises(UsageError, match=text):
        ServeOptions(**{k: ModelSetup(**v) if k == "setup" else v for k, v in kw.items()})


def test_cli_errors_are_one_line(tiny_llama_dir):
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), "--port", "70000"])
    assert r.exit_code == 2 and "Error: --port is 70000" in r.stderr and "Traceback" not in r.stderr
    with bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["serve", "--model", str(tiny_llama_dir), "--port", str(port)])
    assert r.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Hint:" in r.stderr
    r = runner.invoke(app, ["serve", "--model", "/no/such/model", "--port", "0"])
    assert r.exit_code == 1 and "Error:" in r.stderr and "Traceback" not in r.stderr


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_request_schemas():
    r = p.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stop": "x",
        }
    )
    assert r.messages[0].text() == "hi" and r.stops == ["x"] and r.temperature == 1.0
    assert (
        p.ChatRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 5}
        ).token_limit
        == 5
    )
    for bad in (
        {"model": "m", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "a"}],
            "response_format": {"type": "json_object"},
        },
        {"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": float("nan")},
        {"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": [""]},
        {"model": 5, "messages": [{"role": "user", "content": "a"}]},
    ):
        with pytest.raises(ValueError):
            p.ChatRequest.model_validate(bad)
    assert p.CompletionRequest.model_validate({"model": "m", "prompt": ["one"]}).text == "one"
    with pytest.raises(ValueError):
        p.CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
