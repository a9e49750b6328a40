"""hetegen's quantized CPU kernels against torch's packed ones, per weight shape.

Usage: python scripts/quant_kernels.py [--formats int4,int8] [--tokens 1,128]
       [--shapes 2048x2048,...] [--repeat 5] [--threads N] [--output FILE.json]

For each format, shape [out, in] and token count n: one random weight quantized once
(group 32 for int4), two QuantLinear modules over it (hetegen's kernel; torch's, built
inside `cpu_kernels.torch_kernels()`), a few untimed calls, then `repeat` timed rounds in which the two take
turns; each round times enough calls for about 0.2 s. Rotates over copies of the weight that
together exceed 64 MiB, so that the weights come from DRAM as in a model, not from the
cache. Prints one JSON document: per case each kernel's median microseconds per call with
min and max, giga multiply-adds per second, the median speed-up, and each kernel's largest
error against the dequantized weight in float32 (relative to the largest output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.quant import QuantLinear, quantize

POOL_BYTES = 64 << 20


def timed(fn, repeat: int) -> list[float]:
    calls = 1
    while True:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if (elapsed := time.perf_counter() - t) > 0.05 or calls > 1 << 16:
            break
        calls *= 2
    calls = max(1, int(calls * 0.2 / max(elapsed, 1e-9)))
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls)
    return out


def torch_linears(weight, copies: int) -> list[QuantLinear]:
    with cpu_kernels.torch_kernels():
        return [QuantLinear(weight) for _ in range(copies)]


def case(fmt: str, out: int, inp: int, tokens: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    weight = quantize(torch.randn(out, inp, generator=gen), fmt, 32)
    copies = max(1, POOL_BYTES // weight.nbytes)
    arms = {"hetegen": [QuantLinear(weight) for _ in range(copies)], "torch": torch_linears(weight, copies)}
    x = torch.randn(tokens, inp, generator=gen)
    want = F.linear(x, weight.dequantize(torch.float32))
    doc: dict = {"format": fmt, "shape": [out, inp], "tokens": tokens, "copies": copies}
    turn = [0]
    fns = {}
    for name, mods in arms.items():

        def fn(mods=mods):
            turn[0] = (turn[0] + 1) % len(mods)
            return mods[turn[0]](x)

        err = (fn() - want).abs().max().item() / want.abs().max().item()
        doc[name] = {"error": err}
        fns[name] = fn
        for _ in range(3):
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            runs[name] += timed(fn, 1)
    for name, values in runs.items():
        med = statistics.median(values)
        doc[name].update(
            us_median=med * 1e6, us_min=min(values) * 1e6, us_max=max(values) * 1e6,
            gmac_per_s=out * inp * tokens / med / 1e9,
        )  # fmt: skip
    doc["speedup"] = doc["torch"]["us_median"] / doc["hetegen"]["us_median"]
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--tokens", default="1,128")
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,2048x2048,8192x2048,2048x8192")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.kernels() is None:
        raise SystemExit(f"hetegen's kernels are not available here: {cpu_kernels.why_not()}")
    cases = []
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            out, inp = (int(v) for v in shape.split("x"))
            for tokens in (int(t) for t in args.tokens.split(",")):
                cases.append(case(fmt, out, inp, tokens, args.repeat))
    doc = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": cases}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")


if __name__ == "__main__":
    main()
