"""hetegen's own CPU kernels for int4 and int8 weights (kernels/quant_gemm.c, docs/quant.md).

They read hetegen's storage layout as it is (no repacking at load) and quantize the
activations to int16 blocks of 32 (llama.cpp uses int8 blocks; int16 keeps the result 2e-5
from the dequantized weight's). On a 2-core AVX2 machine the int4 kernel ran 2.0-2.8x faster
than torch's packed one at one token (docs/bench.md, "hetegen's CPU kernels"). The C source
is compiled once, on first use, with the system C compiler (`$CC`, else `cc`) into
$HETEGEN_HOME/kernels and loaded with ctypes (models.formats.kernel_lib). Where that is not
possible (no AVX2, no compiler, `HETEGEN_CPU_KERNELS=torch`) `kernels()` is None and
QuantLinear uses torch's packed kernels, after one note saying why.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hetegen_cli.core.console import note
from hetegen_cli.models.formats import cpu_gemm, kernel_lib
from hetegen_cli.models.formats.kernel_lib import ENV, FLAGS, SOURCE, VERSION  # noqa: F401  (their names here)


@dataclass(frozen=True)
class Kernels:
    """The loaded library's entry points (signatures in kernels/quant_gemm.c): int4 and int8
    products with int16 activations (`int4`, `int8`), dequantization for prefill (`dense`),
    `matmul`, which picks between them, and the decode fusions that models.formats.fused
    drives (`gated_ffn`, `rms_norm`, `attention`)."""

    int4_gemm: ctypes._CFuncPtr
    int8_gemm: ctypes._CFuncPtr
    int4_dequant: ctypes._CFuncPtr
    int8_dequant: ctypes._CFuncPtr
    gated_ffn: ctypes._CFuncPtr  # one token's gated MLP / chosen experts (models.formats.fused)
    rms_norm: ctypes._CFuncPtr  # (models.formats.fused)
    attention: ctypes._CFuncPtr  # one token's attention step (models.formats.fused)
    path: Path

    def matmul(
        self, fmt: str, q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, group: int | None,
        x: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """x [n, in] float32 contiguous @ W^T -> y [n, out] float32, W stored as `fmt`: the
        float32 GEMM from DENSE_TOKENS tokens (`dense`), else the int16 products."""
        if x.shape[0] >= DENSE_TOKENS:
            return self.dense(fmt, q, scale, mn, group, x)
        if fmt == "int8":
            return self.int8(q, scale, x)
        return self.int4(q, scale, mn, group, x)

    def dequantize(
        self,
        fmt: str,
        q: torch.Tensor,
        scale: torch.Tensor,
        mn: torch.Tensor | None,
        group: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weight of q's rows as float32 [rows, in], into `out` (contiguous, at least that
        many elements) when given (int4: q uint8 [rows, in / 2], scale and min [rows, in /
        group]; int8: q int8 [rows, in], scale [rows])."""
        rows, inp = q.shape[0], q.shape[1] * (2 if fmt == "int4" else 1)
        w = torch.empty(rows, inp) if out is None else out[: rows * inp].view(rows, inp)
        threads = torch.get_num_threads()
        if fmt == "int4":
            rc = self.int4_dequant(
                q.data_ptr(), scale.data_ptr(), _ptr(mn), rows, inp, group, w.data_ptr(), threads
            )
        else:
            rc = self.int8_dequant(q.data_ptr(), scale.data_ptr(), rows, inp, w.data_ptr(), threads)
        if rc:
            raise ValueError(f"hetegen's {fmt} dequantization refused the shape ({rc})")
        return w

    def dense(
        self, fmt: str, q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, group: int | None,
        x: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """x [n, in] float32 @ W^T through float32 weights (prefill, n >= DENSE_TOKENS):
        `DENSE_CHUNK` floats of W at a time are dequantized into a buffer kept per thread and
        multiplied by the faster float32 GEMM here (models.formats.cpu_gemm). -> y [n, out]
        float32."""
        rows, inp = q.shape[0], x.shape[1]
        step = max(1, DENSE_CHUNK // inp)
        buf = getattr(_SCRATCH, "buf", None)
        if buf is None or buf.numel() < min(rows, step) * inp:
            buf = _SCRATCH.buf = torch.empty(max(DENSE_CHUNK, inp))
        if rows <= step:
            return cpu_gemm.linear(x, self.dequantize(fmt, q, scale, mn, group, buf))
        y = torch.empty(x.shape[0], rows)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            part = self.dequantize(fmt, q[r0:r1], scale[r0:r1], None if mn is None else mn[r0:r1], group, buf)
            y[:, r0:r1] = cpu_gemm.linear(x, part)
        return y

    def int4(
        self, q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None, group: int, x: torch.Tensor
    ) -> torch.Tensor:
        """x [n, in] float32 contiguous, q uint8 [out, in / 2], scale and min float16
        [out, in / group] (min None: symmetric, min = -8 scale, as GGUF Q4_0) -> y [n, out]
        float32."""
        n, rows = x.shape[0], q.shape[0]
        y = torch.empty(n, rows, dtype=torch.float32)
        rc = self.int4_gemm(
            q.data_ptr(), scale.data_ptr(), _ptr(mn), rows, x.shape[1], group,
            x.data_ptr(), n, y.data_ptr(), rows, torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise MemoryError(f"hetegen's int4 kernel failed ({rc})")
        return y

    def int8(self, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] float32 contiguous, q int8 [out, in], scale float16 [out] -> y [n, out]
        float32."""
        n, rows = x.shape[0], q.shape[0]
        y = torch.empty(n, rows, dtype=torch.float32)
        rc = self.int8_gemm(
            q.data_ptr(), scale.data_ptr(), rows, x.shape[1], x.data_ptr(), n, y.data_ptr(), rows,
            torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise MemoryError(f"hetegen's int8 kernel failed ({rc})")
        return y


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


#: from this many tokens (prefill) a product dequantizes W and uses torch's float32 GEMM:
#: at 128 tokens measured 1.03-2.1x faster than the int16 products on [576..8192, 576..8192]
#: weights; at 64 faster on 576-wide ones but 0.6-0.8x on 2048-wide (docs/quant.md)
DENSE_TOKENS = 128
DENSE_CHUNK = 4 << 20  # floats of W dequantized at a time (16 MiB)
_SCRATCH = threading.local()  # one dequantization buffer per thread

_LOADED: list[Kernels | None] = []  # one attempt per process
_WHY_NOT: list[str] = []
_TORCH_ONLY: list[bool] = []  # inside torch_kernels()


def kernels() -> Kernels | None:
    """hetegen's kernels, compiled and loaded on first call; None where they cannot be (the
    reason is `why_not()`, noted once) and inside `torch_kernels()`."""
    if _TORCH_ONLY:
        return None
    if not _LOADED:
        try:
            _LOADED.append(_load())
        except kernel_lib.Unavailable as exc:
            _LOADED.append(None)
            _WHY_NOT.append(str(exc))
            if os.environ.get(ENV, "auto") != "torch":
                note(f"using torch's quantized CPU kernels: {exc}")
    return _LOADED[0]


@contextlib.contextmanager
def torch_kernels() -> Iterator[None]:
    """QuantLinear modules built inside use torch's packed kernels (for scripts that compare
    the two in one process)."""
    _TORCH_ONLY.append(True)
    try:
        yield
    finally:
        _TORCH_ONLY.pop()


def why_not() -> str | None:
    """Why `kernels()` is None, or None when it is not (or was not asked yet)."""
    return _WHY_NOT[0] if _WHY_NOT else None


def label() -> str:
    """Which CPU kernels quantized linears use: "hetegen-avx2" or "torch"."""
    return "hetegen-avx2" if kernels() is not None else "torch"


def _load() -> Kernels:
    lib = kernel_lib.load(lambda: torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    return Kernels(
        lib.hetegen_int4_gemm, lib.hetegen_int8_gemm, lib.hetegen_int4_dequant, lib.hetegen_int8_dequant,
        lib.hetegen_gated_ffn, lib.hetegen_rms_norm, lib.hetegen_attention_decode,
        kernel_lib.library_path(),
    )  # fmt: skip
