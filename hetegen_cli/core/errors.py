"""Errors that the CLI turns into a one-line message plus a hint.

Library code raises these; it never prints or exits. Exit codes: UsageError 2 (like Typer's
own usage errors), every other HetegenError 1 (docs/validation.md).
"""

from __future__ import annotations

import traceback
from typing import Any


class HetegenError(Exception):
    """A handled failure: `message` says what went wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelError(HetegenError):
    """The model argument cannot be resolved, read or loaded."""


class ProfileError(HetegenError):
    """A hardware profile is missing, corrupt or of another schema version."""


class PlanError(HetegenError):
    """A plan is invalid, infeasible, or made for another model."""


class DeviceError(HetegenError):
    """A GPU is required but absent, or the device ran out of memory."""


class InputError(HetegenError):
    """A user-supplied value (prompt, size, path) is invalid."""


class UsageError(InputError):
    """An option's value is malformed or outside its own range, or two options conflict:
    decided without reading a file, a model or the hardware. Exit code 2."""


def describe_error(exc: BaseException, lines: int = 15) -> dict[str, Any]:
    """An error kept in a document instead of ending the run (a profile's `engine_error`, a
    bench arm's): its type, message and the last lines of its traceback."""
    message = exc.message if isinstance(exc, HetegenError) else str(exc)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "type": type(exc).__name__,
        "message": message[:2000],
        "traceback": text.strip().splitlines()[-lines:],
    }
