"""A quantized product at a few token counts three ways: hetegen's int16 products, dequantization +
torch's GEMM, dequantization + oneDNN's GEMM (docs/quant.md, "Prompt products").

Usage: python scripts/prompt_gemm_shapes.py [--shapes 2048x2048,8192x2048] [--tokens 8,16,32,64,128]
       [--formats int4,int8] [--repeat 6] [--threads N] [--output FILE.json]

For each format, weight shape [out, in] and token count: two random weights quantized once (the
calls alternate between them), the three ways taking turns within each of `repeat` + 1 rounds,
the first dropped. Prints one JSON document: the machine, and per case the median microseconds of
each way and which was fastest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from cold_start import load, machine  # scripts/ is sys.path[0]

from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import cpu_gemm, cpu_kernels
from hetegen_cli.models.formats.quant import quantize


def case(kernels: cpu_kernels.Kernels, fmt: str, out: int, inp: int, tokens: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(out + inp + tokens)
    weights = [quantize(torch.randn(out, inp, generator=gen), fmt, 32) for _ in range(2)]
    x = torch.randn(tokens, inp, generator=gen)

    def dense(backend: str):
        def run(w):
            cpu_gemm.force(backend)
            return kernels.dense(fmt, w.q, w.scale, w.min, w.group_size, x)

        return run

    def products(w):
        if fmt == "int8":
            return kernels.int8(w.q, w.scale, x)
        return kernels.int4(w.q, w.scale, w.min, w.group_size, x)

    ways = {"int16": products, "torch": dense("torch"), "onednn": dense("onednn")}
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(repeat + 1):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn(weights[round_ % 2])
            if round_:
                spent[name].append((time.perf_counter() - start) * 1e6)
    us = {name: round(statistics.median(values), 1) for name, values in spent.items()}
    return {"format": fmt, "shape": [out, inp], "tokens": tokens, "us": us, "fastest": min(us, key=us.get)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x2048,8192x2048,2048x8192,1536x576,1024x2048")
    ap.add_argument("--tokens", default="8,16,32,64,128")
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--output", default=None, help="also write the document here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.kernels()
    if kernels is None:
        raise SystemExit(f"hetegen's kernels are not available: {cpu_kernels.why_not()}")
    if cpu_gemm._onednn_missing():
        raise SystemExit(f"oneDNN's GEMM is not available: {cpu_gemm._onednn_missing()}")
    before = machine()
    cases = []
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            out, inp = (int(v) for v in shape.lower().split("x"))
            for tokens in (int(t) for t in args.tokens.split(",")):
                cases.append(case(kernels, fmt, out, inp, tokens, args.repeat))
                print(json.dumps(cases[-1]), flush=True)
    doc = {
        "kind": "hetegen.prompt_gemm_shapes",
        "machine": before,
        "load_after": load(),
        "threads": args.threads,
        "cases": cases,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")


if __name__ == "__main__":
    main()
