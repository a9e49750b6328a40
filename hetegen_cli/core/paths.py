"""Where hetegen keeps its files ($HETEGEN_HOME, default ~/.cache/hetegen), and looking at a
user-given path without letting the operating system's errors escape as tracebacks."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from hetegen_cli.core.errors import InputError

HOME_ENV = "HETEGEN_HOME"


def probe(path: str | Path, what: str) -> os.stat_result | None:
    """stat() of `path` following symlinks, or None when nothing is there.

    `what` names the path for messages ("--model path", "HETEGEN_HOME"). Raises InputError
    for names the file system refuses (too long), symlink loops and folders that cannot be
    searched (permission denied).
    """
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise InputError(
                f"{what} {path} is a symbolic link to a missing target",
                "point the link at an existing file or folder, or pass the target",
            ) from None
        return None
    except OSError as exc:
        raise path_error(exc, path, what) from None


def path_error(exc: OSError, path: str | Path, what: str) -> InputError:
    """A one-line InputError for an OSError about `path`."""
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(
            f"{what} is too long for the file system ({len(str(path))} characters)", "use a shorter path"
        )
    if exc.errno == errno.ELOOP:
        return InputError(f"{what} {path} is a loop of symbolic links", "fix or remove the link")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InputError(
            f"cannot access {what} {path}: permission denied",
            "check the permissions of the path and its folders",
        )
    return InputError(f"cannot access {what} {path}: {exc.strerror or exc}", "check the path")


def is_dir(info: os.stat_result | None) -> bool:
    return info is not None and stat.S_ISDIR(info.st_mode)


def home() -> Path:
    """The hetegen home folder; the HETEGEN_HOME environment variable moves it."""
    env = os.environ.get(HOME_ENV)
    if env:
        path = Path(env).expanduser()
        info = probe(path, HOME_ENV)
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise InputError(f"{HOME_ENV}={path} is not a folder", f"set {HOME_ENV} to a folder")
        return path
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hetegen"


def default_profile_path() -> Path:
    """The saved hardware profile of this machine."""
    return home() / "profile.json"


def models_dir() -> Path:
    """Converted models (GGUF -> safetensors folders) live here."""
    return home() / "models"


def check_writable_folder(folder: Path, what: str, hint: str) -> None:
    """InputError unless `folder` (or its nearest existing ancestor) is a writable folder."""
    current = folder
    while True:
        info = probe(current, what)
        if info is not None:
            break
        if current.parent == current:
            return
        current = current.parent
    if not stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} {folder} cannot be created: {current} is a file", hint)
    if not os.access(current, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder} is not writable ({current} is read-only)", hint)
