"""Time the plan solver on a large model (default llama-2-70b: 80 layers, 560 linears + head).

Usage: python scripts/bench_planner.py [--model llama-2-70b] [--gpu-memory 24GiB] [--repeat 10]
Pure Python: no GPU and no weights needed (shapes from the preset, made-up PCIe-4 desktop
rates). Prints warm-up, then median, min, max and sd of the solve time over the repetitions,
for one solve and for the CPU-format choice (`plan` solves once per (prefill, decode) pair of
the profile's formats: 9 solves for 3 measured formats; docs/plan.md, "CPU formats").
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from hetegen_cli.core.units import parse_size
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import solve

#: Made-up PCIe 4 desktop (docs/method.md §11): B_pcie 25, B_cpu 56, B_dram 70 GB/s.
DESKTOP = cm.Rates(
    weights_dtype="float16",
    cpu_dtype="bfloat16",
    cpu_threads=14,
    cpu_call_s=30e-6,
    cpu_bytes_per_s=56e9,
    cpu_bytes_per_s_concurrent=50e9,
    cpu_flops_per_s=0.8e12,
    dram_bytes_per_s=70e9,
    pcie_bytes_per_s=25e9,
    pcie_bytes_per_s_concurrent=23.5e9,
    pcie_copy_s=10e-6,
    gpu_call_s=8e-6,
    gpu_bytes_per_s=900e9,
    gpu_flops_per_s=150e12,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--gpu-memory", default="24GiB")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    spec = spec_from_config(preset_config(args.model), args.model)
    req = PlanRequest(gpu_budget_bytes=parse_size(args.gpu_memory), cpu_budget_bytes=parse_size("1TiB"))
    t0 = time.perf_counter()
    plan = solve(spec, DESKTOP, req)
    warm = time.perf_counter() - t0
    print(
        f"{args.model}: {len(spec.linears)} block linears, {plan.resident_count} resident, "
        f"{plan.split_count} split at {args.gpu_memory}; warm-up {warm * 1e3:.1f} ms"
    )
    formats = [replace(DESKTOP, cpu_dtype=d) for d in ("float32", "bfloat16", "float16")]
    pairs = [cm.PhaseRates(p, d) for p in formats for d in formats]
    for label, rates in (("one solve", [DESKTOP]), (f"format choice ({len(pairs)} solves)", pairs)):
        samples = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for r in rates:
                solve(spec, r, req)
            samples.append(time.perf_counter() - t0)
        sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
        print(
            f"{label} over {args.repeat} runs: median {statistics.median(samples) * 1e3:.1f} ms, "
            f"min {min(samples) * 1e3:.1f}, max {max(samples) * 1e3:.1f}, sd {sd * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
