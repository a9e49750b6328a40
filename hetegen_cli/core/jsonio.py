"""Files hetegen writes and versioned JSON documents it reads (pure, no torch).

`atomic_write` is the one writer: a temporary file beside the target, fsync, rename, so a
crash never leaves a half-written file. Every document leads with `schema_version` and
`kind`; `read_document` refuses other kinds and unknown versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hetegen_cli.core.errors import HetegenError, InputError


def check_output_path(path: str | Path) -> Path:
    """Fail early (InputError) when `path` cannot become a file; creates nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"output path {path} is a directory", "give a file name, e.g. --output out.json")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(
            f"cannot write {path}: {parent} is a file, not a folder",
            "choose an --output location inside a folder",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write {path}: folder {parent} is not writable",
            "choose an --output location you can write to",
        )
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to a temporary file beside `path`, fsync it,
    give it the usual mode (0666 less the umask) and rename it into place."""
    path = Path(path).expanduser()
    parent = path.parent
    if path.is_dir():
        raise InputError(f"output path {path} is a directory", "give a file name, e.g. out.json")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create folder {parent}: {exc.strerror or exc}",
            "choose an --output location you can write to",
        ) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InputError(
            f"cannot write to {parent}: {exc.strerror or exc}", "choose an --output location you can write to"
        ) from exc
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def dumps(doc: dict[str, Any]) -> str:
    """The canonical JSON text of a document (indented, trailing newline)."""
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def write_document(path: str | Path, doc: dict[str, Any]) -> Path:
    """Atomically write a versioned document."""
    if "schema_version" not in doc or "kind" not in doc:
        raise ValueError("documents must carry schema_version and kind")
    return atomic_write(path, dumps(doc))


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
    path = Path(path).expanduser()
    if not path.exists():
        raise error_cls(f"{kind} file {path} does not exist", f"create it with `{produced_by}`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error_cls(
            f"{kind} file {path} is not readable JSON ({exc.__class__.__name__})",
            f"re-create it with `{produced_by}`",
        ) from exc
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        found = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise error_cls(
            f"{path} is not a {kind} document (kind={found!r})", f"pass a file written by `{produced_by}`"
        )
    version = doc.get("schema_version")
    if version not in supported_versions:
        raise error_cls(
            f"{path} has {kind} schema_version {version!r}; this hetegen reads "
            f"{', '.join(map(str, supported_versions))}",
            f"re-create it with `{produced_by}` from this version of hetegen",
        )
    return doc
