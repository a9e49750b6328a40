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
from collections.abc import Callable, Iterator, Sequence
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


_ACTIVITIES: list[str] = []


@contextlib.contextmanager
def activity(description: str) -> Iterator[None]:
    """Name the long step under way ("loading the model"), for the Ctrl-C message."""
    _ACTIVITIES.append(description)
    try:
        yield
    except KeyboardInterrupt as exc:  # remember the innermost step for the message
        if not hasattr(exc, "hetegen_activity"):
            exc.hetegen_activity = description  # type: ignore[attr-defined]
        raise
    finally:
        _ACTIVITIES.pop()


def printable(text: str) -> str:
    """`text` safe for any terminal: bytes that are not UTF-8 (surrogate escapes from argv or
    file names) shown as \\x.. escapes, whitespace runs folded to one space."""
    raw = text.encode("utf-8", "surrogateescape")
    return " ".join(raw.decode("utf-8", "backslashreplace").split())


def report_error(exc: HetegenError) -> None:
    """`Error: ...` and `Hint: ...` on stderr, one line each."""
    console = stderr_console()
    message = escape(printable(str(exc.message)))
    console.print(f"[bold red]Error:[/bold red] {message}", highlight=False)
    if exc.hint:
        console.print(f"[cyan]Hint:[/cyan] {escape(printable(exc.hint))}", highlight=False)
    if os.environ.get("HETEGEN_DEBUG"):
        traceback.print_exc(file=sys.stderr)


def report_interrupt(command: str, exc: BaseException | None = None) -> None:
    """The one line Ctrl-C prints: what was interrupted, and that nothing partial was left."""
    doing = getattr(exc, "hetegen_activity", None) or (_ACTIVITIES[-1] if _ACTIVITIES else None)
    what = f"while {doing}" if doing else "by Ctrl-C"
    stderr_console().print(
        f"[yellow]Interrupted[/yellow] {escape(what)}: `hetegen {command}` "
        "stopped; no partial file was left.",
        highlight=False,
    )


def table(
    title: str, columns: Sequence[str], left: Sequence[str] | None = None, caption: str | None = None
) -> Any:
    """A rich Table for stdout, its title on the left: the columns in `left` (default: the
    first) left-justified, the others (numbers) right-justified."""
    from rich.table import Table

    left = columns[:1] if left is None else left
    t = Table(title=title, title_justify="left", caption=caption)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    return t
