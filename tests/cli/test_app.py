"""The app shell: --version, every --help, `models`, usage errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetegen_cli import __version__
from hetegen_cli.cli.app import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"hetegen {__version__}"


@pytest.mark.parametrize("command", ["profile", "plan", "run", "bench", "models"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_models_json_lists_presets_with_sizes(presets_home, monkeypatch):
    monkeypatch.setenv("HETEGEN_HOME", str(presets_home))
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["kind"] == "hetegen.models"
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["opt-30b"]["hub_id"] == "facebook/opt-30b"
    assert 29e9 < by_name["opt-30b"]["parameters"] < 31e9
    assert 6.6e9 < by_name["llama-2-7b"]["parameters"] < 6.9e9
    assert [m["name"] for m in doc["models"] if m["default"]] == ["smollm2-135m"]


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
