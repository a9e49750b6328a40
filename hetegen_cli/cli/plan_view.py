"""What `hetegen plan` prints on stdout: the plan's tables, its simulation and its export."""

from __future__ import annotations

from typing import Any

from hetegen_cli.core.console import emit_json, stdout_console, table
from hetegen_cli.core.units import format_bytes

_STRATEGIES = (
    ("hetegen", "hetegen"),
    ("offload", "offload"),
    ("layer_split", "layer split"),
    ("cpu_only", "CPU only"),
)


def render_export(exported: Any, json_: bool) -> None:
    """`--export llama.cpp` on stdout: each placement's flags and predicted decode speed."""
    if json_:
        return emit_json(exported.to_dict())
    console = stdout_console()
    own = exported.hetegen_decode_tokens_per_s
    console.print("llama.cpp flags closest to this plan (docs/plan.md, 'In llama.cpp's terms'):")
    for option in exported.options:
        speed = option.decode_tokens_per_s
        said = "not predicted" if speed is None else f"predicted decode {speed:.3g} tok/s"
        if speed and own:
            said += f"; hetegen's plan {own:.3g} tok/s ({own / speed:.2f}x)"
        console.print(f"\n[bold]{option.kind}[/bold]: {option.what}", highlight=False)
        console.print(f"  {option.command()}", markup=False, highlight=False)
        console.print(f"  {said}", highlight=False)
        for line in option.notes:
            console.print(f"  {line}", markup=False, highlight=False)


_LANES = {
    "host": "main thread",
    "gpu": "GPU",
    "h2d": "H2D",
    "h2d:copy": "H2D (weights)",
    "h2d:compute": "H2D (CPU results)",
    "d2h": "D2H",
}


def render_simulation(plan: Any) -> None:
    """A short summary of the plan's `simulation` section on stdout."""
    sim = plan.simulation
    rec = sim.get("recorded") or {}
    dec, pre = sim["decode"], sim["prefill"]
    console = stdout_console()
    proxy = rec.get("proxy") or {}
    console.print(
        f"Simulation (trace replay, {sim['copy_engines']} host-to-device copy engine(s)); trace recorded "
        f"on {rec.get('machine_cpu')} ({rec.get('backend')} stand-in, proxy hidden "
        f"{proxy.get('hidden_size')}, {proxy.get('num_layers')} layers, prompt {rec.get('prompt_len')}"
        + (", capped" if rec.get("prompt_len_capped") else "")
        + ")",
        highlight=False,
    )
    frac = dec.get("simulated_fraction_of_predicted")
    console.print(
        f"  decode: simulated {_rate(dec, 'simulated_tokens_per_s')} tok/s, predicted "
        f"{_rate(dec, 'predicted_tokens_per_s')}, without host time {_rate(dec, 'ideal_tokens_per_s')}"
        + (f" ({frac:.0%} of predicted)" if frac else ""),
        highlight=False,
    )
    console.print(
        f"  prefill: simulated {pre['simulated_s']:.3f} s, predicted "
        f"{_rate(pre, 'predicted_s', '{:.3f}')} s, without host time {pre['ideal_s']:.3f} s",
        highlight=False,
    )
    busy = ", ".join(f"{_LANES.get(k, k)} {v:.0%}" for k, v in dec["busy_fraction"].items())
    console.print(f"  busy in decode: {busy}", highlight=False)
    path = ", ".join(f"{c['item']} {c['share']:.0%}" for c in dec["critical_path"][:4])
    console.print(f"  decode waited on: {path}", highlight=False)
    per = dec["host"]["per_linear"]
    if "split" in per:
        split = per["split"]
        console.print(
            f"  host time per split linear in decode: {split['within_forward_mean_s'] * 1e6:.0f} us in "
            f"its forward, {split['mean_s'] * 1e6:.0f} us with the model's work before it; "
            f"{dec['host']['total_s'] * 1e3:.2f} ms per decode step"
            + (" (added to the prediction)" if sim.get("host_term_added") else ""),
            highlight=False,
        )


def _rate(fig: dict | None, key: str, fmt: str = "{:.3g}") -> str:
    if not fig or fig.get(key) is None:
        return "-"
    return fmt.format(fig[key])


def render(plan: Any, explain: bool) -> None:
    """The summary tables on stdout; --explain adds one row per linear."""

    from hetegen_cli.plan.sections import HostMemory, ProfileIdentity

    console = stdout_console()
    m, w, b = plan.model, plan.workload, plan.budget
    rt = plan.runtime
    console.print(
        f"Plan for {m.name} ({m.architecture}, {m.dtype}, "
        f"{format_bytes(m.weight_bytes or 0)} of weights): prompt {w.prompt_len}, "
        f"{w.max_new_tokens} new tokens, batch {w.batch_size}",
        highlight=False,
    )
    prof = plan.profile or ProfileIdentity()
    console.print(
        f"Profile: {prof.path} ({prof.cpu_model}; GPU "
        f"{prof.gpu_name or 'none'}); CPU share in "
        + (
            rt.cpu_dtype_prefill
            if rt.cpu_dtype_prefill == rt.cpu_dtype_decode
            else f"{rt.cpu_dtype_prefill} (prefill) and {rt.cpu_dtype_decode} (decode)"
        )
        + ", "
        f"{rt.cpu_threads} threads",
        highlight=False,
    )
    t = table(
        f"GPU memory: budget {format_bytes(b.gpu_budget_bytes or 0)} ({b.gpu_budget_source})",
        ("item", "bytes"),
    )
    gpu = plan.memory.gpu.to_dict() if plan.memory.gpu else {}
    for key, value in gpu.items():
        t.add_row(key.removesuffix("_bytes").replace("_", " "), format_bytes(value))
    host = plan.memory.host or HostMemory()
    cpu_budget = b.cpu_budget_bytes
    parts = "weights + CPU copy + other" + (" + experts" if host.expert_bytes is not None else "")
    t.add_row(
        f"host memory ({parts})",
        f"{format_bytes(host.total_bytes)} of {format_bytes(cpu_budget) if cpu_budget is not None else '?'}",
    )
    console.print(t)
    split = [p for p in plan.placements if not p.resident]
    console.print(
        f"Linears: {plan.resident_count} resident on the GPU, {len(split)} split "
        f"(mean cpu_fraction prefill "
        f"{_mean(p.cpu_fraction_prefill for p in split)}, decode "
        f"{_mean(p.cpu_fraction_decode for p in split)}); LM head "
        f"{'on the GPU' if rt.lm_head_on_gpu else 'planned as a linear'}; "
        f"{rt.staging_buffers} staging buffer(s)",
        highlight=False,
    )
    t = table(
        "Predictions (from the profile)",
        ("strategy", "prefill s", "decode tok/s", "e2e tok/s", "hetegen x", "GPU mem"),
        caption="hetegen x = decode speed of this plan / that strategy's",
    )
    for key, label in _STRATEGIES:
        fig = plan.predictions.to_dict().get(key)
        speed = "1.00x" if key == "hetegen" else _rate(fig, "hetegen_decode_speedup", "{:.2f}x")
        t.add_row(
            label,
            _rate(fig, "prefill_s", "{:.3f}"),
            _rate(fig, "decode_tokens_per_s"),
            _rate(fig, "end_to_end_tokens_per_s"),
            speed if fig else "n/a (no GPU)",
            format_bytes(fig["gpu_memory_bytes"]) if fig else "-",
        )
    console.print(t)
    bd = plan.bounds
    bound_s = bd.bound_s_per_token if bd else None
    if bound_s:
        frac = bd.plan_fraction_of_bound or 0.0
        console.print(
            f"Decode bound (docs/method.md §11): {bound_s:.4g} s/token = {1 / bound_s:.3g} "
            f"tok/s with {format_bytes(bd.w_host_bytes)} of weights on the host; "
            f"the plan predicts {frac:.0%} of it",
            highlight=False,
        )
    if explain:  # one row per linear: wider than a terminal is fine here
        from rich.console import Console

        _render_linears(Console(file=console.file, width=max(console.width, 150)), plan)


def _mean(values: Any) -> str:
    vals = list(values)
    return f"{sum(vals) / len(vals):.3f}" if vals else "-"


def _render_linears(console: Any, plan: Any) -> None:

    columns = ("linear", "out x in", "resident", "cpu_fraction pre/dec", "prefill cpu/xfer/gpu")
    t = table(
        "Per linear (times in ms; layer = max(cpu, transfer + gpu))",
        (*columns, "decode cpu/xfer/gpu", "decode layer"),
    )
    t.columns[0].no_wrap = True
    for i, p in enumerate(plan.placements):
        est = plan.estimates[i] if plan.estimates else None
        pre = "/".join(f"{t * 1e3:.3f}" for t in _shares(est.prefill)) if est else "-"
        dec = "/".join(f"{t * 1e3:.3f}" for t in _shares(est.decode)) if est else "-"
        t.add_row(
            p.name,
            f"{p.out_features}x{p.in_features}",
            "yes" if p.resident else "",
            f"{p.cpu_fraction_prefill:.3f}/{p.cpu_fraction_decode:.3f}",
            pre,
            dec,
            f"{est.decode.layer_s * 1e3:.3f}" if est else "-",
        )
    console.print(t)


def _shares(times: Any) -> tuple[float, float, float]:
    """(cpu, transfer, gpu) seconds of a plan.sections.LinearTimes."""
    return times.cpu_s, times.transfer_s, times.gpu_s
