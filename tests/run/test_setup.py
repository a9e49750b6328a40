"""What to load (ModelSetup) and what to generate (GenerationRequest): checked once, for every
command that loads a model; and the model-setup options, declared once for the CLI."""

from __future__ import annotations

import inspect

import pytest

from hetegen_cli.cli.app import app
from hetegen_cli.core.errors import UsageError
from hetegen_cli.run.generate import SamplingOptions
from hetegen_cli.run.setup import GenerationRequest, ModelSetup


@pytest.mark.parametrize(
    "kw, text",
    [
        ({"model": " "}, "--model is empty"),
        ({"quant": "int3"}, "unknown --quant"),
        ({"dtype": "float8"}, "unknown --dtype"),
        ({"device": "tpu"}, "unknown --device"),
        ({"plan_path": "p.json", "gpu_budget_bytes": 1}, "--plan and --gpu-memory cannot be combined"),
        ({"device": "cpu", "gpu_budget_bytes": 1}, "no effect with --device cpu"),
    ],
)
def test_a_bad_setup_is_a_usage_error(kw, text):
    with pytest.raises(UsageError, match=text):
        ModelSetup(**kw)


def test_a_setup_has_no_prompt_and_a_request_no_model():
    assert ModelSetup().plan_path is None and ModelSetup(device="cpu", dtype="bfloat16").quant == "auto"
    assert not {"prompt", "chat", "sampling"} & set(inspect.signature(ModelSetup).parameters)
    assert not {"model", "dtype", "device"} & set(inspect.signature(GenerationRequest).parameters)


@pytest.mark.parametrize(
    "request_, text",
    [
        (GenerationRequest(" "), "the prompt is empty"),
        (GenerationRequest("hi", max_new_tokens=0), "--max-new-tokens 0"),
        (GenerationRequest("hi", sampling=SamplingOptions(top_p=2.0)), "--top-p"),
    ],
)
def test_a_bad_request_is_a_usage_error(request_, text):
    with pytest.raises(UsageError, match=text):
        request_.validate()


def _options(command: str) -> list[str]:
    group = next(c for c in app.registered_commands if c.name == command)
    return [name for name in inspect.signature(group.callback).parameters]


def test_run_serve_and_eval_declare_the_setup_options_once():
    setup = ["model", "quant", "dtype", "device", "plan", "gpu_memory", "profile"]
    for command in ("run", "serve"):
        names = _options(command)
        assert "setup" not in names
        assert [n for n in names if n in setup] == setup
    assert [n for n in _options("eval") if n in setup] == ["model", "quant", "dtype", "device", "profile"]
