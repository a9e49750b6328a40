"""The CPU side of a decode split of routed experts (docs/plan.md §2a), measured on this CPU.

Usage: python scripts/expert_split_cpu.py [--hidden 2048] [--intermediate 768] [--experts 128]
       [--top-k 8] [--format int4] [--splits 0,192,320,448] [--steps 200] [--rounds 7]
       [--profile profile.json]

A decode split gives the GPU the first k intermediate units of each chosen CPU-side expert and
leaves the CPU the other I - k; the planner prices the CPU's part as an expert of I - k units
(costmodel.experts.expert_s with `units`). This script checks that assumption on the CPU alone:
it builds `--experts` random experts of the given shapes (default: Qwen3-30B-A3B's, int4 with
groups of 32, stored as hetegen holds them), splits each at every k of `--splits`
(models.formats.quant_experts.split_expert), builds the one-call decode kernel over the rests
(fused_experts, as the engine does), and times a decode step's CPU experts: `--top-k` random
experts per step for one token, `--steps` steps per timing, the splits interleaved over
`--rounds` rounds (the machine is shared: compare within a round). The experts take far more
than the last-level cache, as a real layer's do. Prints per split the median microseconds a
step (and the spread), its ratio to the whole expert's, and the share of the bytes left to
the CPU, (I - k) / I, which is what the planner's CPU time scales with (besides a per-call
cost). With `--profile` (a `hetegen profile` of this machine) it also prints the cost model's
time for each step: as the planner prices it (costmodel.experts.cpu_side_s: one kernel call a
step with hetegen's kernels) and with a call per expert part (how it priced them before).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from hetegen_cli.models.formats.quant import quantize
from hetegen_cli.models.formats.quant_experts import CpuExpert, fused_experts, split_expert


def _experts(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.intermediate
    out = []
    for _ in range(args.experts):
        parts = {
            "gate": quantize(torch.randn(i, h, generator=g) * 0.02, args.format),
            "up": quantize(torch.randn(i, h, generator=g) * 0.02, args.format),
            "down": quantize(torch.randn(h, i, generator=g) * 0.02, args.format),
        }
        out.append(parts)
    return out


def _time(ffn, hidden: int, steps: list[list[int]]) -> float:
    """Seconds a step: the chosen experts of each step in one kernel call, as decode does."""
    x = torch.randn(1, hidden)
    out = torch.zeros(1, hidden)
    coef = [1.0 / len(steps[0])] * len(steps[0])
    start = time.perf_counter()
    for sel in steps:
        ffn.add(x, sel, coef, out)
    return (time.perf_counter() - start) / len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--format", default="int4", choices=["int4", "int8"])
    ap.add_argument("--splits", default="0,192,320,448")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", help="a hetegen profile of this machine: print the cost model's times too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = [int(k) for k in args.splits.split(",")]
    act = nn.SiLU()
    whole = _experts(args)
    kernels = {}
    for k in splits:
        rests = [CpuExpert(split_expert(p, k)[1] if k else p, act) for p in whole]
        ffn = fused_experts(rests)
        if ffn is None:
            raise SystemExit("hetegen's CPU kernels are not available here: nothing to measure")
        kernels[k] = (ffn, rests)
    rng = random.Random(0)
    steps = [rng.sample(range(args.experts), args.top_k) for _ in range(args.steps)]
    for k in splits:  # warm-up
        _time(kernels[k][0], args.hidden, steps[:10])
    seconds: dict[int, list[float]] = {k: [] for k in splits}
    for _ in range(args.rounds):
        for k in splits:
            seconds[k].append(_time(kernels[k][0], args.hidden, steps))
    held = sum(p.nbytes for p in (whole[0]["gate"], whole[0]["up"], whole[0]["down"])) * args.experts
    print(
        f"{args.experts} experts [{args.intermediate} x {args.hidden}] {args.format}, "
        f"{held / 2**20:.0f} MiB, top-{args.top_k}, {args.threads} threads, {args.rounds} rounds"
    )
    predicted = _predicted(args, splits) if args.profile else {}
    base = statistics.median(seconds[splits[0]])
    for k in splits:
        s = seconds[k]
        med = statistics.median(s)
        print(
            f"k={k:5d}: {med * 1e6:8.1f} us a step ({min(s) * 1e6:.1f}-{max(s) * 1e6:.1f}), "
            f"{med / base:.3f} of k={splits[0]}, bytes left "
            f"{(args.intermediate - k) / (args.intermediate - splits[0]):.3f}"
            + (
                f"; cost model {predicted[k][0] * 1e6:.1f} us (a call per part: {predicted[k][1] * 1e6:.1f})"
                if predicted
                else ""
            )
        )


def _predicted(args, splits: list[int]) -> dict[int, tuple[float, float]]:
    """k -> (the planner's seconds a step, the same with a call per expert part), from the
    profile's rates for the format (no PCIe contention: the CPU alone)."""
    import json
    from pathlib import Path

    from hetegen_cli.models.shapes.experts import ExpertsSpec
    from hetegen_cli.plan.costmodel.experts import cpu_side_s, expert_s
    from hetegen_cli.plan.costmodel.fit import quant_rates, rates_from_profile

    profile = json.loads(Path(args.profile).read_text(encoding="utf-8"))
    base, _ = rates_from_profile(profile, "bfloat16", None, 1)
    rates, _ = quant_rates(profile, base, args.format, 32)
    x = ExpertsSpec("experts", 0, args.experts, args.top_k, args.hidden, args.intermediate, 2)
    x = x.quantized(args.format, 32)
    quant = {args.format: rates}
    out = {}
    for k in splits:
        units = args.intermediate - k
        planned = cpu_side_s(base, x, {1: args.top_k}, 1, False, quant, units)
        per_part = args.top_k * expert_s(base, x, 1, False, False, quant, units)
        out[k] = (planned, per_part)
    return out


if __name__ == "__main__":
    main()
