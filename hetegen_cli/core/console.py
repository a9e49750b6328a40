"""The output sink: data to stdout (table or JSON), people-facing text to stderr.

`--json` prints exactly one document on stdout and nothing else; progress goes to stderr and
is disabled for `--json` and when stderr is not a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hetegen_cli.core.errors import HetegenError

F = TypeVar("F", bound=Callable[..., Any])


def stdout_console() -> Console:
    """Console for data (tables) on stdout. Created per call so tests capture it."""
    return Console(file=sys.stdout, soft_wrap=True)


def stderr_console() -> Console:
    """Console for people: status, warnings, errors, timings."""
    return Console(file=sys.stderr, soft_wrap=True)


def emit_json(doc: dict[str, Any]) -> None:
    """Print one JSON document on stdout, plain (no markup)."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A dimmed status line on stderr."""
    stderr_console().print(f"[dim]{escape(message)}[/dim]", highlight=False)


def warn(message: str) -> None:
    stderr_console().print(f"[yellow]Warning:[/yellow] {escape(message)}", highlight=False)


class _NullProgress:
    """Progress stand-in used when progress display is off."""

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        return 0

    def update(self, task_id: int, **_: Any) -> None:
        pass

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Any]:
    """A Rich progress display on stderr, or a no-op when disabled or stderr is no TTY."""
    if not enabled or not sys.stderr.isatty() or os.environ.get("HETEGEN_NO_PROGRESS"):
        yield _NullProgress()
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=True,
    ) as bar:
        yield bar


def report_error(exc: HetegenError) -> None:
    """`Error: ...` and `Hint: ...` on stderr, one line each."""
    console = stderr_console()
    message = escape(" ".join(str(exc.message).split()))
    console.print(f"[bold red]Error:[/bold red] {message}", highlight=False)
    if exc.hint:
        console.print(f"[cyan]Hint:[/cyan] {escape(exc.hint)}", highlight=False)
    if os.environ.get("HETEGEN_DEBUG"):
        traceback.print_exc(file=sys.stderr)
