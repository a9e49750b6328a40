"""`hetegen plan`: solve the per-linear CPU/GPU split for a model, a profile and a GPU budget."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from hetegen_cli.cli.common import (
    AllowFloatCopyOption,
    CpuDtypeOption,
    CpuMoeOption,
    GpuBudgetOption,
    JsonOption,
    ModelOption,
    NCpuMoeOption,
    ProfileOption,
    PromptLenOption,
    QuantChoice,
    QuantOption,
    WeightsDtypeOption,
    cpu_dtype_arg,
    dtype_arg,
    guarded,
    input_file_arg,
    model_arg,
    output_arg,
    size_bytes,
)
from hetegen_cli.core.console import activity, emit_json, note, progress, stdout_console, table, warn
from hetegen_cli.core.errors import PlanError, UsageError
from hetegen_cli.core.units import format_bytes

_STRATEGIES = (
    ("hetegen", "hetegen"),
    ("offload", "offload"),
    ("layer_split", "layer split"),
    ("cpu_only", "CPU only"),
)


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @guarded
    def plan_command(
        model: ModelOption = None,
        profile: ProfileOption = None,
        gpu_memory: GpuBudgetOption = None,
        cpu_memory: str | None = typer.Option(
            None, "--cpu-memory", help="Host memory budget, e.g. 48GiB. Default: the profiled available RAM."
        ),
        prompt_len: PromptLenOption = 512,
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generated tokens."),
        batch_size: int = typer.Option(1, "--batch-size", help="Sequences per step."),
        dtype: WeightsDtypeOption = None,
        cpu_dtype: CpuDtypeOption = None,
        quant: QuantOption = QuantChoice.auto,
        allow_float_copy: AllowFloatCopyOption = False,
        reserve: str = typer.Option(
            "1GiB",
            "--reserve",
            help="GPU memory kept for the CUDA context, kernels and allocator (Accelerate advises 1-2 GB).",
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Save the plan JSON here (atomically)."
        ),
        json_: JsonOption = False,
        explain: bool = typer.Option(False, "--explain", help="Add the per-linear table."),
        calibrate_runs: list[Path] | None = typer.Option(
            None,
            "--calibrate",
            help="Deprecated: use `hetegen calibrate RUN.json ...` (the same; no plan is made).",
        ),
        simulate: bool = typer.Option(
            False,
            "--simulate",
            help="Record the engine's operations for this plan (on a small proxy, CPU stand-in) and "
            "replay them with the profile's speeds: adds a `simulation` section and the engine's "
            "host time to the prediction.",
        ),
        timeline: Path | None = typer.Option(
            None,
            "--timeline",
            help="Draw one simulated decode step as lanes (main thread, copy engines, GPU) into "
            "this PNG file (implies --simulate; needs matplotlib).",
        ),
        copy_engines: int | None = typer.Option(
            None,
            "--copy-engines",
            help="Host-to-device copy engines of the GPU, 1 or 2 (default: the profile's probe, else 1).",
        ),
        cpu_moe: CpuMoeOption = False,
        n_cpu_moe: NCpuMoeOption = 0,
    ) -> None:
        """Plan which share of every linear layer the CPU computes (cpu_fraction, per phase),
        which weights stay on the GPU, and predict the speed against pure offloading, a static
        layer split and CPU-only."""
        from hetegen_cli.measure.profile import load_or_measure
        from hetegen_cli.models.loading.source import resolve_model
        from hetegen_cli.plan.document import save_plan
        from hetegen_cli.plan.request import PlanRequest
        from hetegen_cli.plan.solver import make_plan

        if calibrate_runs:
            from hetegen_cli.cli.calibrate import calibrate

            warn("`hetegen plan --calibrate` is deprecated: use `hetegen calibrate RUN.json ...`")
            runs = [input_file_arg(r, "--calibrate") for r in calibrate_runs]
            return calibrate(runs, input_file_arg(profile, "--profile"), json_)
        req = PlanRequest(
            prompt_len=prompt_len,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            gpu_budget_bytes=size_bytes(gpu_memory, "--gpu-memory"),
            cpu_budget_bytes=size_bytes(cpu_memory, "--cpu-memory"),
            cpu_dtype=cpu_dtype_arg(cpu_dtype),
            reserve_bytes=size_bytes(reserve, "--reserve"),
            model_arg=model or "",
            cpu_moe=cpu_moe,
            n_cpu_moe=n_cpu_moe,
        )
        output = output_arg(output)
        timeline = _timeline_arg(timeline)
        simulate = simulate or timeline is not None
        if copy_engines is not None and copy_engines not in (1, 2):
            raise UsageError(
                f"--copy-engines is {copy_engines}; it must be 1 or 2", "pass --copy-engines 1 or 2"
            )
        profile = input_file_arg(profile, "--profile")
        ref = resolve_model(
            model_arg(model),
            need_weights=False,
            dtype=dtype_arg(dtype, "--dtype"),
            quant=quant.value,
            allow_float_copy=allow_float_copy,
        )
        for message in ref.warnings:
            warn(message)
        ref.spec.check_context(req.prompt_len, req.max_new_tokens, "--prompt-len")
        if simulate and ref.spec.experts:
            raise PlanError(
                f"--simulate does not replay mixture-of-experts plans yet "
                f"({ref.spec.name} has routed experts)",
                "plan without --simulate and --timeline",
            )
        with progress(enabled=not json_) as bar:
            doc, identity = load_or_measure(profile, bar)
        doc, engines_note = _with_copy_engines(doc, copy_engines)
        plan = make_plan(ref.spec, doc, req, profile_identity=identity)
        if engines_note:
            plan = replace(plan, notes=(*plan.notes, engines_note))
        drawn = None
        if simulate:
            plan, drawn = _simulate(plan, ref.spec, doc, timeline)
        saved = save_plan(plan, output) if output is not None else None
        if json_:
            emit_json(plan.to_dict())
        else:
            render(plan, explain)
            if plan.simulation:
                render_simulation(plan)
        for message in plan.warnings:
            warn(message)
        for message in plan.notes:
            note(message)
        if drawn is not None:
            note(f"timeline saved to {drawn}")
        if saved is not None:
            note(f"plan saved to {saved}")


def _timeline_arg(value: Path | None) -> Path | None:
    """--timeline: a writable .png path, checked (with matplotlib) before any work."""
    if value is None:
        return None
    path = output_arg(value, "--timeline")
    if path.suffix.lower() != ".png":
        raise UsageError(f"--timeline {value} is not a .png file name", "give a file name ending in .png")
    from hetegen_cli.run.simulate import check_matplotlib

    check_matplotlib()
    return path


def _with_copy_engines(doc: dict, copy_engines: int | None) -> tuple[dict, str | None]:
    """The profile document with its copy-engine count replaced by --copy-engines (the plan
    is then made for it: the engine's copy order, the pipeline model, the simulation)."""
    gpu = doc.get("gpu")
    if copy_engines is None or not gpu:
        return doc, None
    probe = dict(gpu.get("copy_engine_probe") or {})
    measured = probe.get("h2d_copy_engines")
    probe.setdefault("small_copy_alone_s", 0.0)
    probe.setdefault("small_copy_during_big_s", 0.0)
    probe.setdefault("big_copy_s", 0.0)
    probe["h2d_copy_engines"] = copy_engines
    said = f"the profile's probe found {measured}" if measured else "the profile has no probe result"
    return (
        {**doc, "gpu": {**gpu, "copy_engine_probe": probe}},
        f"--copy-engines {copy_engines}: planned for {copy_engines} host-to-device copy engine(s) ({said})",
    )


def _simulate(plan: Any, spec: Any, profile: dict, timeline: Path | None) -> tuple[Any, Path | None]:
    """The plan with its trace replay (plan.simulate.with_simulation), and the timeline drawn."""
    from hetegen_cli.plan.costmodel.fixed import fixed_costs_from_profile
    from hetegen_cli.plan.simulate import with_simulation
    from hetegen_cli.run.simulate import draw_timeline, record_trace

    if not plan.runtime.requires_gpu or plan.split_count == 0:
        why = "an all-CPU plan" if not plan.runtime.requires_gpu else "plain GPU inference"
        warn(f"--simulate: this plan is {why}; there is no CPU/GPU pipeline to replay")
        if timeline is not None:
            warn(f"--timeline: nothing drawn, {timeline} not written")
        return plan, None
    with activity("recording the engine's operations on a proxy of the model"):
        trace, info = record_trace(plan, spec)
    fixed = fixed_costs_from_profile(profile)
    on_gpu = fixed is not None and fixed.has("cuda")
    plan, sims = with_simulation(plan, spec, trace, fixed_costs_on_gpu=on_gpu, recorded=info)
    if timeline is None:
        return plan, None
    dec = plan.simulation["decode"]
    title = (
        f"{plan.model.name}: one decode step replayed, {dec['simulated_s'] * 1e3:.2f} ms "
        f"(predicted {dec['predicted_s'] * 1e3:.2f} ms, without host time {dec['ideal_s'] * 1e3:.2f} ms)\n"
        f"{plan.simulation['copy_engines']} host-to-device copy engine(s); speeds from the profile, "
        f"operations from the engine on the {info['backend']} stand-in"
    )
    return plan, draw_timeline(sims["decode"].simulated, timeline, title)


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
