"""Host time per split linear through the engine's CUDA code path, on the CPU.

Usage: python scripts/host_time.py [--shape 64x64] [--calls 2000] [--rounds 5] [--threads 1]

A GPU is not needed: `core.devices.CudaPathBackend` reports itself as CUDA, so the engine takes
every CUDA path (pinned scratch, the copy of x to the host, the worker thread, output slots,
events, the join copy, the prefetch scheduler), but its copies are plain memcpy and its events
are already complete. With a small shape (default 64 rows x 64 columns, one token) the matmuls
themselves cost ~1 us, so the time per call is what the engine's Python and torch dispatch cost
on the critical path: the host time a real GPU would also pay per split linear.

Prints, per round, the median microseconds per call of: a plain nn.Linear, a split linear
(half the rows on the CPU worker, half streamed), a streamed-only linear (k = 0) and a
CPU-only linear (k = out), all through one engine with prefetch. Compare within a round: the
machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hetegen_cli.core.devices import CudaPathBackend
from hetegen_cli.engine.split_linear import EngineContext, HeteroLinear
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings


def _placement(name: str, out: int, inp: int, k: int) -> LinearPlacement:
    return LinearPlacement(name, 0, "proj", out, inp, False, k, k)


def _per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64x64", help="OUTxIN of the linear")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out, inp = (int(v) for v in args.shape.lower().split("x"))
    torch.manual_seed(0)
    runtime = RuntimeSettings(
        weights_dtype="float32",
        cpu_dtype_prefill="float32",
        cpu_dtype_decode="float32",
        cpu_threads=args.threads,
        staging_buffers=2,
        prefetch_depth=1,
    )
    ctx = EngineContext(CudaPathBackend(), runtime)
    plain = nn.Linear(inp, out)
    kinds = {"split": out // 2, "streamed": 0, "cpu-only": out}
    layers = {}
    for kind, k in kinds.items():
        # three linears per kind in a cycle, as in a model: the scheduler learns their order
        layers[kind] = [
            HeteroLinear.from_linear(nn.Linear(inp, out), _placement(f"{kind}.{i}", out, inp, k), ctx)
            for i in range(3)
        ]
    ctx.finalize()

    def cycle(kind: str):
        mods = layers[kind]

        def run(x: torch.Tensor) -> None:
            ctx.begin_pass("decode")
            for m in mods:
                m(x)

        return run

    x = torch.randn(1, inp)
    results: dict[str, list[float]] = {"plain nn.Linear": [], **{k: [] for k in kinds}}
    with torch.inference_mode():
        for kind in kinds:  # warm-up, and the first pass that learns the order
            cycle(kind)(x)
            cycle(kind)(x)
        print(f"shape {out}x{inp}, 1 token, {args.calls} calls per measurement, threads {args.threads}")
        for r in range(args.rounds):
            row = {"plain nn.Linear": _per_call_us(plain, x, args.calls)}
            for kind in kinds:
                row[kind] = _per_call_us(cycle(kind), x, args.calls // 3) / 3
            for key, value in row.items():
                results[key].append(value)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row.items()))
    print("median: " + ", ".join(f"{k} {statistics.median(v):.1f} us" for k, v in results.items()))
    ctx.close()


if __name__ == "__main__":
    main()
