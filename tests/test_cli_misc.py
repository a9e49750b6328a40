"""The app shell: --version, every --help, `models`, and the shared helpers (units, atomic writes)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from hetegen_cli import __version__
from hetegen_cli.cli import app
from hetegen_cli.errors import InputError
from hetegen_cli.jsonio import atomic_write_text
from hetegen_cli.units import format_bytes, parse_size

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"hetegen {__version__}"


@pytest.mark.parametrize("command", ["profile", "plan", "run", "bench", "models"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_models_json_lists_presets_with_sizes():
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


@pytest.mark.parametrize("text,expected", [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6),
                                            ("1048576", 2**20), ("0.5 GB", 5 * 10**8), ("0", 0)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["six gigs", "4 parsecs", "-1GiB", ""])
def test_parse_size_rejects_bad_text(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "doc.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 12345)  # not text: fails while writing
    assert target.read_text() == "old"
    assert [p.name for p in folder.iterdir()] == ["doc.json"]  # no temp file left
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
