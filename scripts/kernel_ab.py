"""Two builds of hetegen's CPU kernels (kernels/quant_gemm.c) against each other, interleaved in
one process: the decode fusions' calls and two products at a model's shapes.

Usage: python scripts/kernel_ab.py OLD.c NEW.c [--shape 135m|1.7b] [--pos 128] [--rounds 30]

e.g. `git show HEAD~1:hetegen_cli/models/formats/kernels/quant_gemm.c > /tmp/old.c`, then
`python scripts/kernel_ab.py /tmp/old.c hetegen_cli/models/formats/kernels/quant_gemm.c`.
Compiles both with cpu_kernels.FLAGS into a temporary folder, builds random int4 weights (int8
for the LM head) in hetegen's layout, enough copies to rotate through ~48 MiB so that weights
come from memory as in decoding (at least two copies, so that no call finds the previous
call's weights in a 32 MiB L3), and times each call `rounds` times per build, the builds
taking turns. Prints per call: each build's median microseconds, the speed ratio and the
largest difference between their outputs. Needs AVX2 and a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from hetegen_cli.models.formats import cpu_kernels, fused
from hetegen_cli.models.formats.quant import QuantLinear, quantize

#: hidden, intermediate, heads, kv heads, head dim, vocabulary
SHAPES = {"135m": (576, 1536, 9, 3, 64, 49152), "1.7b": (2048, 8192, 32, 32, 64, 49152)}


def build(source: Path, folder: Path, name: str) -> ctypes.CDLL:
    target = folder / f"{name}.so"  # a temporary folder: nothing is written next to the sources
    subprocess.run(["gcc", *cpu_kernels.FLAGS, str(source), "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.hetegen_gated_ffn.argtypes = [p, i, p, p, p, i, p, i]
    lib.hetegen_attention_decode.argtypes = [p, p, p, p, p, p, p, p, p, i]
    lib.hetegen_int4_gemm.argtypes = [p, p, p, i, i, i, p, i, p, i, i]
    lib.hetegen_int8_gemm.argtypes = [p, p, i, i, p, i, p, i, i]
    return lib


def linear(rows: int, k: int, fmt: str = "int4") -> QuantLinear:
    return QuantLinear(quantize(torch.randn(rows, k) * 0.05, fmt, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--pos", type=int, default=128, help="positions already in the KV cache")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hetegen-kernel-ab-"))
    libs = [build(args.old, folder, "old"), build(args.new, folder, "new")]
    h, inter, nh, nkv, hd, vocab = SHAPES[args.shape]
    threads = args.threads
    copies = max(2, (48 << 20) // int(h * (3 * inter + 2 * h + 2 * nkv * hd) * 0.6))
    keep: list = []
    units = []
    for _ in range(copies):
        parts = [linear(inter, h), linear(inter, h), linear(h, inter)]
        keep += parts
        units.append(fused.gated_unit(*parts))
    desc = torch.tensor(units, dtype=torch.int64)
    x, out = torch.randn(h), torch.zeros(h)
    ids = [(ctypes.c_int32 * 1)(c) for c in range(copies)]
    coef = (ctypes.c_float * 1)(1.0)
    attn = []
    for _ in range(copies):
        parts = [linear(nh * hd, h), linear(nkv * hd, h), linear(nkv * hd, h), linear(h, nh * hd)]
        keep += parts
        attn.append((ctypes.c_int64 * 28)(*[v for m in parts for v in fused.matrix(m)]))
    room = max(4096, args.pos + 1)
    kb, vb = torch.randn(nkv, room, hd), torch.randn(nkv, room, hd)
    ints = (ctypes.c_int64 * 15)(h, nh, nkv, hd, 0, 0, room, args.pos, 0, 0, 0, 0, 0, 0, 0)
    floats = (ctypes.c_float * 5)(0, 0, 0, 0, hd**-0.5)
    cs, sn = torch.randn(hd), torch.randn(hd)
    head, y = linear(vocab, h, "int8"), torch.empty(1, vocab)
    xh, small, ys = torch.randn(1, h), [linear(h, h) for _ in range(copies)], torch.empty(1, h)

    def ffn(lib, c):
        lib.hetegen_gated_ffn(
            desc.data_ptr(), 1, ctypes.addressof(ids[c]), ctypes.addressof(coef), x.data_ptr(), h,
            out.data_ptr(), threads,
        )  # fmt: skip

    def attention(lib, c):
        lib.hetegen_attention_decode(
            ctypes.addressof(attn[c]), ctypes.addressof(ints), ctypes.addressof(floats), x.data_ptr(),
            cs.data_ptr(), sn.data_ptr(), kb.data_ptr(), vb.data_ptr(), out.data_ptr(), threads,
        )  # fmt: skip

    def lm_head(lib, c):
        b = head._buffers
        lib.hetegen_int8_gemm(
            b["q"].data_ptr(),
            b["scales"].data_ptr(),
            vocab,
            h,
            xh.data_ptr(),
            1,
            y.data_ptr(),
            vocab,
            threads,
        )

    def int4(lib, c):
        b = small[c]._buffers
        lib.hetegen_int4_gemm(
            b["q"].data_ptr(), b["scales"].data_ptr(), b["mins"].data_ptr(), h, h, 32, xh.data_ptr(), 1,
            ys.data_ptr(), h, threads,
        )  # fmt: skip

    calls = {
        "gated_ffn": ffn,
        f"attention@{args.pos}": attention,
        "int8 LM head": lm_head,
        f"int4 {h}x{h}": int4,
    }
    print(f"shape {args.shape}, {threads} threads, {copies} copies of the weights, {args.rounds} rounds")
    for name, call in calls.items():
        outputs = []
        for lib in libs:
            out.zero_()
            call(lib, 0)
            outputs.append((out.clone(), y.clone(), ys.clone()))
        diff = max((a - b).abs().max().item() for a, b in zip(*outputs, strict=True))
        times: list[list[float]] = [[], []]
        for _ in range(args.rounds):
            for j, lib in enumerate(libs):
                start = time.perf_counter()
                for c in range(copies * 4):
                    call(lib, c % copies)
                times[j].append((time.perf_counter() - start) / (copies * 4) * 1e6)
        a, b = statistics.median(times[0]), statistics.median(times[1])
        print(
            f"{name:16s} old {a:8.1f} us  new {b:8.1f} us  new/old speed {a / b:.2f}x  difference {diff:.2e}"
        )


if __name__ == "__main__":
    main()
