"""`hetegen plan`: solve the per-linear CPU/GPU split for a model, a profile and a GPU budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hetegen_cli.cli.common import (
    CpuDtypeOption,
    JsonOption,
    ModelOption,
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
from hetegen_cli.core.console import emit_json, note, progress, stdout_console, warn
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
        gpu_memory: str | None = typer.Option(
            None,
            "--gpu-memory",
            help="GPU memory budget, e.g. 6GiB. Default: the profiled "
            "free GPU memory less 5% of the total; 0 = all-CPU plan.",
        ),
        cpu_memory: str | None = typer.Option(
            None, "--cpu-memory", help="Host memory budget, e.g. 48GiB. Default: the profiled available RAM."
        ),
        prompt_len: PromptLenOption = 512,
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generated tokens."),
        batch_size: int = typer.Option(1, "--batch-size", help="Sequences per step."),
        dtype: WeightsDtypeOption = None,
        cpu_dtype: CpuDtypeOption = None,
        quant: QuantOption = QuantChoice.auto,
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
            help="Refit the fixed costs from `run --json` / `bench --json` output of this machine "
            "(repeatable) and save the calibration next to the profile; no plan is made.",
        ),
    ) -> None:
        """Plan which share of every linear layer the CPU computes (cpu_fraction, per phase),
        which weights stay on the GPU, and predict the speed against pure offloading, a static
        layer split and CPU-only."""
        from hetegen_cli.models.source import resolve_model
        from hetegen_cli.plan.document import save_plan
        from hetegen_cli.plan.request import PlanRequest
        from hetegen_cli.plan.solver import make_plan
        from hetegen_cli.profile.measure import load_or_measure

        if calibrate_runs:
            from hetegen_cli.cli.calibrate import calibrate

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
        )
        output = output_arg(output)
        profile = input_file_arg(profile, "--profile")
        ref = resolve_model(
            model_arg(model), need_weights=False, dtype=dtype_arg(dtype, "--dtype"), quant=quant.value
        )
        for message in ref.warnings:
            warn(message)
        ref.spec.check_context(req.prompt_len, req.max_new_tokens, "--prompt-len")
        with progress(enabled=not json_) as bar:
            doc, identity = load_or_measure(profile, bar, engine_costs=_measure_engine_costs)
        plan = make_plan(ref.spec, doc, req, profile_identity=identity)
        saved = save_plan(plan, output) if output is not None else None
        if json_:
            emit_json(plan.to_dict())
        else:
            render(plan, explain)
        for message in plan.warnings:
            warn(message)
        for message in plan.notes:
            note(message)
        if saved is not None:
            note(f"plan saved to {saved}")


def _measure_engine_costs(**kwargs: Any) -> dict:
    """run.engine_costs.measure_for_profile, imported only when a profile must be measured
    (it imports torch; planning from a saved profile does not)."""
    from hetegen_cli.run.engine_costs import measure_for_profile

    return measure_for_profile(**kwargs)


def _rate(fig: dict | None, key: str, fmt: str = "{:.3g}") -> str:
    if not fig or fig.get(key) is None:
        return "-"
    return fmt.format(fig[key])


def render(plan: Any, explain: bool) -> None:
    """The summary tables on stdout; --explain adds one row per linear."""
    from rich.table import Table

    console = stdout_console()
    m, w, b = plan.model, plan.workload, plan.budget
    rt = plan.runtime
    console.print(
        f"Plan for {m['name']} ({m['architecture']}, {m['dtype']}, "
        f"{format_bytes(m['weight_bytes'])} of weights): prompt {w['prompt_len']}, "
        f"{w['max_new_tokens']} new tokens, batch {w['batch_size']}",
        highlight=False,
    )
    prof = plan.profile or {}
    console.print(
        f"Profile: {prof.get('path')} ({prof.get('cpu_model')}; GPU "
        f"{prof.get('gpu_name') or 'none'}); CPU share in "
        + (
            rt.cpu_dtype_prefill
            if rt.cpu_dtype_prefill == rt.cpu_dtype_decode
            else f"{rt.cpu_dtype_prefill} (prefill) and {rt.cpu_dtype_decode} (decode)"
        )
        + ", "
        f"{rt.cpu_threads} threads",
        highlight=False,
    )
    t = Table(
        title=f"GPU memory: budget {format_bytes(b['gpu_budget_bytes'])} ({b['gpu_budget_source']})",
        title_justify="left",
    )
    t.add_column("item")
    t.add_column("bytes", justify="right")
    for key, value in plan.memory["gpu"].items():
        t.add_row(key.removesuffix("_bytes").replace("_", " "), format_bytes(value))
    host = plan.memory["host"]
    cpu_budget = b.get("cpu_budget_bytes")
    t.add_row(
        "host memory (weights + CPU copy + other)",
        f"{format_bytes(host['total_bytes'])} of "
        f"{format_bytes(cpu_budget) if cpu_budget is not None else '?'}",
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
    t = Table(title="Predictions (from the profile)", title_justify="left")
    t.caption = "hetegen x = decode speed of this plan / that strategy's"
    for col in ("strategy", "prefill s", "decode tok/s", "e2e tok/s", "hetegen x", "GPU mem"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for key, label in _STRATEGIES:
        fig = plan.predictions.get(key)
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
    bound_s = bd.get("bound_s_per_token")
    if bound_s:
        frac = bd.get("plan_fraction_of_bound") or 0.0
        console.print(
            f"Decode bound (docs/method.md §11): {bound_s:.4g} s/token = {1 / bound_s:.3g} "
            f"tok/s with {format_bytes(bd['w_host_bytes'])} of weights on the host; "
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
    from rich.table import Table

    t = Table(title="Per linear (times in ms; layer = max(cpu, transfer + gpu))", title_justify="left")
    for col in (
        "linear",
        "out x in",
        "resident",
        "cpu_fraction pre/dec",
        "prefill cpu/xfer/gpu",
        "decode cpu/xfer/gpu",
        "decode layer",
    ):
        t.add_column(col, justify="left" if col == "linear" else "right", no_wrap=col == "linear")
    for i, p in enumerate(plan.placements):
        est = plan.estimates[i] if plan.estimates else None
        pre = (
            "/".join(f"{est.prefill[k] * 1e3:.3f}" for k in ("cpu_s", "transfer_s", "gpu_s")) if est else "-"
        )
        dec = "/".join(f"{est.decode[k] * 1e3:.3f}" for k in ("cpu_s", "transfer_s", "gpu_s")) if est else "-"
        t.add_row(
            p.name,
            f"{p.out_features}x{p.in_features}",
            "yes" if p.resident else "",
            f"{p.cpu_fraction_prefill:.3f}/{p.cpu_fraction_decode:.3f}",
            pre,
            dec,
            f"{est.decode['layer_s'] * 1e3:.3f}" if est else "-",
        )
    console.print(t)
