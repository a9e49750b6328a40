"""hetegen's CPU kernel library (kernels/quant_gemm.c) compiled and loaded with ctypes, without
torch: models.formats.cpu_kernels wraps it for torch tensors, models.formats.direct calls it
with numpy arrays.

The C source is compiled once, on first use, with the system C compiler (`$CC`, else `cc`)
into $HETEGEN_HOME/kernels/quant_gemm-<hash>.so, through a temporary file renamed into place.
`load()` raises `Unavailable` (with the reason) where that is not possible: not x86-64 with
AVX2/FMA/F16C, no compiler, `HETEGEN_CPU_KERNELS=torch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from hetegen_cli.core import paths

ENV = "HETEGEN_CPU_KERNELS"  # "auto" (default) or "torch"
SOURCE = Path(__file__).with_name("kernels") / "quant_gemm.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
VERSION = 6  # hetegen_kernels_version() of the source


class Unavailable(Exception):
    """The kernels cannot be used here; the message says why."""


def load(avx2_unknown: Callable[[], bool] | None = None) -> ctypes.CDLL:
    """The library with its entry points' argument types set, compiled first if needed.
    `avx2_unknown` answers whether the CPU has AVX2 where /proc/cpuinfo cannot be read (else:
    assumed not)."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "torch"):
        raise Unavailable(f"{ENV}={choice!r} is not one of auto, torch")
    if choice == "torch":
        raise Unavailable(f"{ENV}=torch")
    avx2 = has_avx2()
    if avx2 is None:
        avx2 = avx2_unknown() if avx2_unknown is not None else False
    if platform.machine().lower() not in ("x86_64", "amd64") or not avx2:
        raise Unavailable("this CPU has no AVX2")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise Unavailable("no C compiler found (set CC, or install gcc)")
    target = library_path(compiler)
    if not target.exists():
        _compile(compiler, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise Unavailable(f"cannot load {target}: {exc}") from None
    if lib.hetegen_kernels_version() != VERSION:
        raise Unavailable(f"{target} is not version {VERSION} of the kernels")
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, args in (
        ("hetegen_int4_gemm", [p, p, p, i, i, i, p, i, p, i, i]),
        ("hetegen_int8_gemm", [p, p, i, i, p, i, p, i, i]),
        ("hetegen_int4_dequant", [p, p, p, i, i, i, p, i]),
        ("hetegen_int8_dequant", [p, p, i, i, p, i]),
        ("hetegen_gated_ffn", [p, i, p, p, p, i, p, i]),
        ("hetegen_rms_norm", [p, p, i, i, ctypes.c_float, ctypes.c_float, p]),
        ("hetegen_attention_decode", [p, p, p, p, p, p, p, p, p, i]),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i
    return lib


def library_path(compiler: str | None = None) -> Path:
    """Where the library compiled from this source with `compiler` lives (its name hashes both)."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    return paths.home() / "kernels" / f"quant_gemm-{key}.so"


def has_avx2() -> bool | None:
    """Whether /proc/cpuinfo lists AVX2, FMA and F16C; None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return {"avx2", "fma", "f16c"} <= set(flags)


def _compile(compiler: str, target: Path) -> None:
    """Compile the source into `target`, through a temporary file renamed into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise Unavailable(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"{compiler} could not compile them: {last}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{compiler} could not compile them: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
