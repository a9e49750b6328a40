"""Helpers shared by tests that drive the command line."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from hetegen_cli.cli.app import app


def cli(*args: str) -> Any:
    """Invoke `hetegen ARGS...` in-process (typer's CliRunner; stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args))


def run_quick(*args: str) -> Any:
    """`hetegen run --prompt Hello --max-new-tokens 2 ARGS...`."""
    return cli("run", "--prompt", "Hello", "--max-new-tokens", "2", *args)


def assert_error(result: Any, *needles: str, exit_code: int = 1) -> None:
    """One handled error: the exit code, nothing on stdout, no traceback, `Error:` first and
    a `Hint:` line on stderr, every needle in stderr."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("Error:"), result.stderr
    assert any(line.startswith("Hint:") for line in lines), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
