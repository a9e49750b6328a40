"""Files hetegen writes and versioned JSON documents it reads (pure, no torch).

`atomic_write` is the one writer: a temporary file beside the target, fsync, rename, so a
crash never leaves a half-written file; through a symbolic link it replaces the link's
target, not the link. Every document leads with `schema_version` and `kind`;
`read_document` refuses other kinds and unknown versions with a message that says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from hetegen_cli.core.errors import HetegenError, InputError
from hetegen_cli.core.paths import path_error, probe

_WRITE_HINT = "choose an --output location you can write to"


def _target(path: str | Path) -> Path:
    """Where writing `path` lands: the final target of a symbolic link, else `path`."""
    path = Path(path).expanduser()
    try:
        if path.is_symlink():
            probe(path, "output path")  # loops and dangling links: a clear error
            return Path(os.path.realpath(path))
    except OSError as exc:
        raise path_error(exc, path, "output path") from None
    return path


def check_output_path(path: str | Path) -> Path:
    """Fail early (InputError) when `path` cannot become a file; creates nothing."""
    path = _target(path)
    info = probe(path, "output path")
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise InputError(f"output path {path} is a directory", "give a file name, e.g. --output out.json")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise InputError(f"output path {path} is not a regular file", "give a file name")
    parent = path.parent
    while probe(parent, "output folder") is None and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"cannot write {path}: {parent} is a file, not a folder",
            "choose an --output location inside a folder",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable", _WRITE_HINT)
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to a temporary file beside `path`, fsync it,
    give it the usual mode (0666 less the umask) and rename it into place. Returns the path
    written (a symbolic link's target)."""
    path = check_output_path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create folder {parent}: {exc.strerror or exc}", _WRITE_HINT) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(f"cannot write to {parent}: {exc.strerror or exc}", _WRITE_HINT) from exc
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}",
            "free disk space or choose another location; nothing was written",
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def dumps(doc: dict[str, Any]) -> str:
    """The canonical JSON text of a document (indented, trailing newline, no NaN)."""
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_document(path: str | Path, doc: dict[str, Any]) -> Path:
    """Atomically write a versioned document."""
    if "schema_version" not in doc or "kind" not in doc:
        raise ValueError("documents must carry schema_version and kind")
    return atomic_write(path, dumps(doc))


def read_json(path: str | Path, what: str, error_cls: type[HetegenError], hint: str) -> Any:
    """The JSON value in file `path` (UTF-8, a byte-order mark allowed), or `error_cls`
    saying why not: missing, unreadable, not UTF-8, or where the JSON syntax breaks."""
    path = Path(path).expanduser()
    info = probe(path, f"{what} file")
    if info is None:
        raise error_cls(f"{what} file {path} does not exist", hint)
    if stat.S_ISDIR(info.st_mode):
        raise error_cls(f"{what} file {path} is a folder", "pass the file itself")
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise error_cls(
            f"cannot read {what} file {path}: permission denied", "check its permissions"
        ) from None
    except OSError as exc:
        raise error_cls(f"cannot read {what} file {path}: {exc.strerror or exc}", hint) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error_cls(f"{what} file {path} is not UTF-8 text (byte {exc.start})", hint) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error_cls(
            f"{what} file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", hint
        ) from None
    except RecursionError:
        raise error_cls(f"{what} file {path} nests too deeply to be a {what}", hint) from None


def read_document(
    path: str | Path,
    kind: str,
    supported_versions: tuple[int, ...],
    error_cls: type[HetegenError],
    produced_by: str,
) -> dict[str, Any]:
    """Read a JSON document of `kind`, refusing corrupt files and unknown versions.

    `produced_by` names the command that writes it (for the hint, e.g. "hetegen profile").
    """
    name = kind.removeprefix("hetegen.")
    doc = read_json(path, name, error_cls, f"re-create it with `{produced_by}`")
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        found = doc.get("kind") if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise error_cls(
            f"{path} is not a {kind} document (kind={found!r})", f"pass a file written by `{produced_by}`"
        )
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise error_cls(
            f"{path}: schema_version must be a whole number, got {version!r}",
            f"re-create it with `{produced_by}`",
        )
    if version not in supported_versions:
        raise error_cls(
            f"{path} has {kind} schema_version {version}; this hetegen reads "
            f"{', '.join(map(str, supported_versions))}",
            f"re-create it with `{produced_by}` from this version of hetegen",
        )
    return doc
