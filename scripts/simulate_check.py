"""Issue 18's simulation table: the engine's own trace replayed against the plan's prediction.

Usage: python scripts/simulate_check.py [--cases a10-opt30b,...] [--copy-engines N] [--json]

Each case plans a preset with `make_plan` on a MADE-UP profile (tests/fakes.make_profile: round
numbers, not a measured machine), records the plan's trace on its proxy through the engine on
the CPU stand-in (run.simulate.record_trace: host times are this machine's), and replays it
(plan.simulate.with_simulation, as `hetegen plan --simulate` does). Columns, decode tok/s:

  predicted  the plan's prediction, which includes the trace's host time (these profiles have
             no engine costs measured on a GPU)
  simulated  the trace replay with the recorded host time
  ideal      the trace replay with no host time
  ratio      simulated / predicted (target: >= 0.90)

The `*-olmoe` and `*-qwen3moe-*` cases are mixture-of-experts plans (docs/plan.md, "Trace
replay": their experts are priced from the plan, their host time recorded on the proxy).

The made-up machines:
  a10   PCIe 4 (25 GB/s), one host-to-device copy engine, a 16-core CPU (GEMV 50 GB/s, DRAM
        70 GB/s, 1.5 TFLOP/s), an A10-like GPU (24 GB, 600 GB/s, 125 TFLOP/s fp16)
  h100  PCIe 5 (50 GB/s), two host-to-device copy engines, the same CPU with DRAM 150 GB/s, an
        H100-like GPU (80 GB, 3 TB/s, 750 TFLOP/s fp16)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fakes: the made-up profiles

GB = 1e9
GiB = 2**30
MACHINES = {
    "a10": dict(
        cpu_bw=50 * GB,
        cpu_flops=1.5e12,
        dram=70 * GB,
        threads=16,
        cpu_call_s=20e-6,
        pcie_bw=25 * GB,
        pcie_copy_s=10e-6,
        hbm=600 * GB,
        gpu_flops=125e12,
        gpu_call_s=8e-6,
        free=23 * GiB,
        total=24 * GiB,
        ram_available=200 * GiB,
        copy_engines=1,
    ),
    "h100": dict(
        cpu_bw=50 * GB,
        cpu_flops=1.5e12,
        dram=150 * GB,
        threads=16,
        cpu_call_s=20e-6,
        pcie_bw=50 * GB,
        pcie_copy_s=8e-6,
        hbm=3000 * GB,
        gpu_flops=750e12,
        gpu_call_s=6e-6,
        free=78 * GiB,
        total=80 * GiB,
        ram_available=400 * GiB,
        copy_engines=2,
    ),
}
CASES = {
    "a10-opt30b": ("a10", "opt-30b", 6 * GiB),
    "a10-opt6.7b": ("a10", "opt-6.7b", 4 * GiB),
    "h100-opt30b": ("h100", "opt-30b", 6 * GiB),
    "h100-opt6.7b": ("h100", "opt-6.7b", 4 * GiB),
    # mixture of experts: experts placed by use (uniform), the rest computed by the CPU
    "a10-olmoe": ("a10", "olmoe-1b-7b", 4 * GiB),
    "a10-qwen3moe-8g": ("a10", "qwen3-30b-a3b", 8 * GiB),
    "a10-qwen3moe-12g": ("a10", "qwen3-30b-a3b", 12 * GiB),
}


def made_up_profile(machine: str, copy_engines: int | None = None) -> dict:
    from tests.fakes import make_profile

    args = dict(MACHINES[machine])
    engines = copy_engines or args.pop("copy_engines")
    args.pop("copy_engines", None)
    doc = make_profile(**args)
    doc["host"]["cpu_model"] = f"MADE-UP 16-core CPU ({machine}-like machine)"
    doc["gpu"]["name"] = f"MADE-UP {machine.upper()}-like GPU"
    doc["gpu"]["copy_engine_probe"] = {
        "small_copy_alone_s": 10e-6,
        "small_copy_during_big_s": 10e-6 if engines >= 2 else 5e-3,
        "big_copy_s": 5e-3,
        "h2d_copy_engines": engines,
    }
    return doc


def run_case(name: str, copy_engines: int | None, replay_engines: int | None = None) -> dict:
    """One case; `replay_engines` replays on that many copy engines whatever the plan (and so
    the engine's copy order) assumed."""
    from hetegen_cli.models.loading.source import resolve_model
    from hetegen_cli.plan.request import PlanRequest
    from hetegen_cli.plan.simulate import with_simulation
    from hetegen_cli.plan.solver import make_plan
    from hetegen_cli.run.simulate import record_trace

    machine, model, budget = CASES[name]
    ref = resolve_model(model, need_weights=False)
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=budget, model_arg=model)
    plan = make_plan(ref.spec, made_up_profile(machine, copy_engines), req)
    trace, info = record_trace(plan, ref.spec)
    plan, _ = with_simulation(
        plan, ref.spec, trace, fixed_costs_on_gpu=False, copy_engines=replay_engines, recorded=info
    )
    sim = plan.simulation
    dec = sim["decode"]
    return {
        "case": name,
        "model": model,
        "gpu_memory_gib": budget / GiB,
        "copy_engines": sim["copy_engines"],
        "staging_buffers": plan.runtime.staging_buffers,
        "split_linears": plan.split_count,
        **(
            {
                "experts_on_gpu": f"{sum(len(x.gpu) for x in plan.experts)} of "
                f"{sum(x.num_experts for x in plan.experts)}",
                "expert_layers_split": sum(bool(x.split_units and x.cpu) for x in plan.experts),
            }
            if plan.experts
            else {}
        ),
        "predicted_tok_s": dec["predicted_tokens_per_s"],
        "simulated_tok_s": dec["simulated_tokens_per_s"],
        "ideal_tok_s": dec["ideal_tokens_per_s"],
        "ratio": dec.get("simulated_fraction_of_predicted"),
        "predicted_without_host_tok_s": 1.0
        / (plan.predictions.hetegen.decode_s_per_token - dec["host"]["total_s"]),
        "host_ms_per_step": dec["host"]["total_s"] * 1e3,
        "host_us_per_split_linear": (dec["host"]["per_linear"].get("split") or {}).get("mean_s", 0.0) * 1e6,
        "critical_path": [(c["item"], round(c["share"], 3)) for c in dec["critical_path"][:3]],
        "busy": {k: round(v, 3) for k, v in dec["busy_fraction"].items()},
        "recorded": sim["recorded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--copy-engines", type=int, choices=(1, 2), default=None)
    parser.add_argument(
        "--replay-engines",
        type=int,
        choices=(1, 2),
        default=None,
        help="replay on this many copy engines whatever the plan assumed: --copy-engines 2 "
        "--replay-engines 1 shows the early copy order (the engine before issue 18) on one engine",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [
        run_case(c.strip(), args.copy_engines, args.replay_engines)
        for c in args.cases.split(",")
        if c.strip()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    rec = rows[0]["recorded"]
    print(
        f"trace: {rec['backend']} on {rec['machine_cpu']} ({rec['logical_cores']} logical cores), "
        f"{rec['recorded_utc']}; profiles MADE UP (tests/fakes.make_profile)"
    )
    head = (
        f"{'case':<14} {'engines':>7} {'predicted':>10} {'simulated':>10} {'ideal':>8} {'ratio':>6} "
        f"{'host ms/step':>12} {'host us/split':>13}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['case']:<14} {r['copy_engines']:>7} {r['predicted_tok_s']:>10.3f} "
            f"{r['simulated_tok_s']:>10.3f} {r['ideal_tok_s']:>8.3f} {r['ratio']:>6.2f} "
            f"{r['host_ms_per_step']:>12.1f} {r['host_us_per_split_linear']:>13.0f}"
        )
    print("decode tok/s; predicted includes the trace's host time; ratio = simulated / predicted")
    for r in rows:
        path = ", ".join(f"{item} {share:.0%}" for item, share in r["critical_path"])
        experts = (
            f", experts on the GPU {r['experts_on_gpu']}, {r['expert_layers_split']} layers split"
            if "experts_on_gpu" in r
            else ""
        )
        print(
            f"{r['case']}: {r['split_linears']} split linears, {r['staging_buffers']} buffer(s){experts}; "
            f"critical path: {path}"
        )


if __name__ == "__main__":
    main()
