"""The hardware profile document: schema, build, validate, load, save (pure, no torch).

`hetegen profile` writes it; `plan` reads it. Every timing is a stats dict
{"mean", "sd", "samples"} in seconds per call; rates are derived from the mean.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hetegen_cli import __version__
from hetegen_cli.core.errors import ProfileError
from hetegen_cli.core.jsonio import read_document, write_document

PROFILE_KIND = "hetegen.profile"
PROFILE_SCHEMA_VERSION = 1
PRODUCED_BY = "hetegen profile"
GPU_SKIPPED_NOTE = "no CUDA GPU: GPU measurements skipped"

#: CPU flags that matter to matrix kernels (names as in /proc/cpuinfo).
CPU_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "avx_vnni",
    "neon",
    "asimd",
)


def rate(amount: float, seconds: dict[str, Any]) -> float:
    """amount / mean seconds (bytes/s, params/s, FLOP/s); 0 if the mean is not positive."""
    mean = float(seconds["mean"])
    return amount / mean if mean > 0 else 0.0


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_profile(
    host: dict, cpu: dict, gpu: dict | None, gpu_note: str | None, quick: bool, created_utc: str | None = None
) -> dict[str, Any]:
    """The profile document, leading with schema_version and kind."""
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "kind": PROFILE_KIND,
        "hetegen_version": __version__,
        "created_utc": created_utc or utc_now(),
        "quick": bool(quick),
        "host": host,
        "cpu": cpu,
        "gpu": gpu,
        "gpu_note": gpu_note,
    }


# --- schema -----------------------------------------------------------------------------
# A spec is a type (or tuple of types), NUM / RATE / INT markers, a dict (object with these
# required keys; extra keys allowed), a one-item list (list of such items) or Nullable(spec).


class _Num:
    """A finite real number (bool excluded); `positive` demands > 0."""

    def __init__(self, positive: bool = False, integer: bool = False) -> None:
        self.positive, self.integer = positive, integer


class Nullable:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


NUM, RATE, INT, COUNT = _Num(), _Num(positive=True), _Num(integer=True), _Num(True, True)
STATS = {"mean": NUM, "sd": NUM, "samples": [NUM]}

SCHEMA: dict[str, Any] = {
    "schema_version": INT,
    "kind": str,
    "hetegen_version": str,
    "created_utc": str,
    "quick": bool,
    "host": {
        "cpu_model": str,
        "physical_cores": COUNT,
        "logical_cores": COUNT,
        "ram_total_bytes": COUNT,
        "ram_available_bytes": INT,
        "features": dict,
        "os": str,
        "python": str,
        "torch": str,
    },
    "cpu": {
        "threads": COUNT,
        "memory_read_bytes_per_s": STATS,
        "gemv": [
            {
                "dtype": str,
                "out_features": COUNT,
                "in_features": COUNT,
                "weight_bytes": COUNT,
                "threads": COUNT,
                "seconds": STATS,
                "weight_bytes_per_s": RATE,
                "params_per_s": RATE,
            }
        ],
        "gemm": [
            {
                "dtype": str,
                "tokens": COUNT,
                "out_features": COUNT,
                "in_features": COUNT,
                "threads": COUNT,
                "seconds": STATS,
                "flops_per_s": RATE,
            }
        ],
        "thread_sweep": [
            {
                "threads": COUNT,
                "dtype": str,
                "out_features": COUNT,
                "in_features": COUNT,
                "weight_bytes_per_s": RATE,
            }
        ],
        "best_gemv_dtype": str,
    },
    "gpu": Nullable(
        {
            "name": str,
            "total_memory_bytes": COUNT,
            "free_memory_bytes": INT,
            "compute_capability": str,
            "gemm": [
                {
                    "dtype": str,
                    "tokens": COUNT,
                    "out_features": COUNT,
                    "in_features": COUNT,
                    "seconds": STATS,
                    "flops_per_s": RATE,
                }
            ],
            "gemv": [
                {
                    "dtype": str,
                    "out_features": COUNT,
                    "in_features": COUNT,
                    "weight_bytes": COUNT,
                    "seconds": STATS,
                    "weight_bytes_per_s": RATE,
                }
            ],
            "transfers": [
                {"direction": str, "memory": str, "size_bytes": COUNT, "seconds": STATS, "bytes_per_s": RATE}
            ],
            "concurrent": {
                "dtype": str,
                "size_bytes": COUNT,
                "h2d_alone_bytes_per_s": RATE,
                "h2d_bytes_per_s": RATE,
                "cpu_gemv_alone_weight_bytes_per_s": RATE,
                "cpu_gemv_weight_bytes_per_s": RATE,
            },
        }
    ),
    "gpu_note": Nullable(str),
}


def _type_name(spec: Any) -> str:
    if isinstance(spec, _Num):
        kind = "integer" if spec.integer else "number"
        return f"positive {kind}" if spec.positive else kind
    if isinstance(spec, dict):
        return "object"
    if isinstance(spec, list):
        return "list"
    if isinstance(spec, Nullable):
        return f"{_type_name(spec.spec)} or null"
    return getattr(spec, "__name__", str(spec))


def _check(value: Any, spec: Any, where: str) -> str | None:
    """The first problem found as text naming the field, or None."""
    if isinstance(spec, Nullable):
        return None if value is None else _check(value, spec.spec, where)
    if isinstance(spec, _Num):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (not spec.integer or float(value).is_integer())
        if ok and (value > 0 if spec.positive else (not spec.integer or value >= 0)):
            return None
        return f"field {where} should be a {_type_name(spec)}, got {value!r}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"field {where} should be an object, got {type(value).__name__}"
        for key, sub in spec.items():
            name = f"{where}.{key}" if where else key
            if key not in value:
                return f"field {name} is missing"
            problem = _check(value[key], sub, name)
            if problem:
                return problem
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"field {where} should be a list, got {type(value).__name__}"
        for i, item in enumerate(value):
            problem = _check(item, spec[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, spec) and not (spec is not bool and isinstance(value, bool)):
        return None
    return f"field {where} should be {_type_name(spec)}, got {type(value).__name__}"


def validate_profile(doc: dict[str, Any], source: str = "profile") -> dict[str, Any]:
    """Check required fields and types; raise ProfileError naming the first bad field."""
    problem = _check(doc, SCHEMA, "")
    if problem is None and not doc["cpu"]["gemv"]:
        problem = "field cpu.gemv is empty"
    if problem is None and doc["cpu"]["best_gemv_dtype"] not in {m["dtype"] for m in doc["cpu"]["gemv"]}:
        problem = "field cpu.best_gemv_dtype names a dtype without GEMV measurements"
    if problem:
        raise ProfileError(f"{source} is not a valid hardware profile: {problem}", f"re-run `{PRODUCED_BY}`")
    return doc


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read and validate a saved profile; ProfileError (hint: re-run) on any problem."""
    doc = read_document(path, PROFILE_KIND, (PROFILE_SCHEMA_VERSION,), ProfileError, PRODUCED_BY)
    return validate_profile(doc, str(path))


def save_profile(doc: dict[str, Any], path: str | Path) -> Path:
    """Validate, then write atomically (no half-written file on failure)."""
    validate_profile(doc)
    return write_document(path, doc)


# --- helpers for readers (the planner, bench) --------------------------------------------


def gemv_entries(doc: dict, dtype: str, side: str = "cpu") -> list[dict]:
    """GEMV measurements of `dtype` on `side` ("cpu" or "gpu"), smallest weight first."""
    section = doc.get(side) or {}
    return sorted(
        (m for m in section.get("gemv", []) if m["dtype"] == dtype), key=lambda m: m["weight_bytes"]
    )


def mean_seconds(entry: dict) -> float:
    """Mean seconds per call of one measurement entry."""
    return float(entry["seconds"]["mean"])


def pinned_h2d(doc: dict) -> list[dict]:
    """Pinned host-to-GPU copies, smallest first ([] without a GPU)."""
    gpu = doc.get("gpu") or {}
    return sorted(
        (t for t in gpu.get("transfers", []) if t["direction"] == "h2d" and t["memory"] == "pinned"),
        key=lambda t: t["size_bytes"],
    )


def identity(profile: dict, path: str | Path | None) -> dict:
    """Who made a plan's numbers: the plan's `profile` section (path, date, machine, sha256
    of the file's bytes when `path` is given)."""
    sha = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest() if path else None
    gpu = profile.get("gpu") or {}
    return {
        "path": str(path) if path else None,
        "created_utc": profile.get("created_utc"),
        "cpu_model": (profile.get("host") or {}).get("cpu_model"),
        "gpu_name": gpu.get("name"),
        "quick": profile.get("quick"),
        "sha256": sha,
    }


def available_ram(profile: dict) -> int | None:
    """Host RAM available when the profile was taken, in bytes."""
    value = (profile.get("host") or {}).get("ram_available_bytes")
    return int(value) if value else None


def gpu_memory(profile: dict) -> tuple[int | None, int | None]:
    """(free, total) GPU memory in bytes when the profile was taken; (None, None) without a GPU."""
    gpu = profile.get("gpu")
    if not gpu:
        return None, None
    return int(gpu["free_memory_bytes"]), int(gpu["total_memory_bytes"])
