"""Human sizes: parse "6GiB", "512MB", "1e9" into bytes and format bytes back."""

from __future__ import annotations

import math
import re

from hetegen_cli.core.errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


#: the largest size accepted (1 PiB): far beyond any machine, and exact in every later sum
MAX_SIZE_BYTES = 1024**5


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes from "6GiB", "512MB", "0.5 GB", "1048576". UsageError on bad text, a negative or
    non-finite number, or more than MAX_SIZE_BYTES."""
    if isinstance(text, bool):
        raise UsageError(f"cannot read {what} {text!r}", "give a size such as 6GiB")
    if isinstance(text, (int, float)):
        value, unit = float(text) if math.isfinite(text) else math.inf, ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(
                f"cannot read {what} {text!r}",
                "write a number with an optional unit, e.g. 6GiB, 512MB or 1073741824",
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise UsageError(
            f"unknown unit {unit!r} in {what} {text!r}",
            "use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)",
        )
    if value < 0:
        raise UsageError(f"{what} {text!r} is negative", "give a size of zero or more")
    if not math.isfinite(value) or value * _UNITS[unit] > MAX_SIZE_BYTES:
        raise UsageError(f"{what} {text!r} is too large", "give a size of at most 1 PiB, e.g. 6GiB")
    return round(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """'1.50 GiB' style, binary units."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_rate(bytes_per_s: float) -> str:
    """'23.4 GB/s' (decimal, as bandwidths are usually quoted)."""
    return f"{bytes_per_s / 1e9:.1f} GB/s"


def format_flops(flops_per_s: float) -> str:
    """'1.23 TFLOP/s' or '456.7 GFLOP/s'."""
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.2f} TFLOP/s"
    return f"{flops_per_s / 1e9:.1f} GFLOP/s"
