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
    ExpertUseOption,
    GpuBudgetOption,
    JsonOption,
    ModelOption,
    NCpuMoeOption,
    NoExpertSplitOption,
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
from hetegen_cli.cli.plan_view import render, render_export, render_simulation
from hetegen_cli.core.console import activity, emit_json, note, progress, warn
from hetegen_cli.core.errors import UsageError


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
        export: str | None = typer.Option(
            None,
            "--export",
            help="Print the plan in another tool's terms instead of the plan's tables: llama.cpp "
            "(the -ngl / -ot flags closest to the plan, each with its predicted decode speed).",
        ),
        copy_engines: int | None = typer.Option(
            None,
            "--copy-engines",
            help="Host-to-device copy engines of the GPU, 1 or 2 (default: the profile's probe, else 1).",
        ),
        cpu_moe: CpuMoeOption = False,
        n_cpu_moe: NCpuMoeOption = 0,
        no_expert_split: NoExpertSplitOption = False,
        expert_use: ExpertUseOption = None,
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
            expert_split=not no_expert_split,
        )
        output = output_arg(output)
        _export_arg(export)
        timeline = _timeline_arg(timeline)
        simulate = simulate or timeline is not None
        if copy_engines is not None and copy_engines not in (1, 2):
            raise UsageError(
                f"--copy-engines is {copy_engines}; it must be 1 or 2", "pass --copy-engines 1 or 2"
            )
        profile = input_file_arg(profile, "--profile")
        expert_use = input_file_arg(expert_use, "--expert-use")
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
        use_warnings: list[str] = []
        if expert_use is not None:
            from hetegen_cli.plan.expert_use import load_expert_stats

            stats, use_warnings = load_expert_stats(expert_use, ref.spec)
            req = replace(req, expert_use=stats)
        with progress(enabled=not json_) as bar:
            doc, identity = load_or_measure(profile, bar)
        doc, engines_note = _with_copy_engines(doc, copy_engines)
        plan = make_plan(ref.spec, doc, req, profile_identity=identity)
        if engines_note:
            plan = replace(plan, notes=(*plan.notes, engines_note))
        if use_warnings:
            plan = replace(plan, warnings=(*plan.warnings, *use_warnings))
        drawn = None
        if simulate:
            plan, drawn = _simulate(plan, ref.spec, doc, timeline, req.expert_use)
        exported = _export(plan, ref.spec, req, doc, identity) if export else None
        saved = save_plan(plan, output) if output is not None else None
        if exported is not None:
            render_export(exported, json_)
        elif json_:
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


def _export_arg(value: str | None) -> None:
    """--export: a tool hetegen can express plans for."""
    from hetegen_cli.plan.export import EXPORT_TOOLS

    if value is not None and value not in EXPORT_TOOLS:
        raise UsageError(f"unknown --export {value!r}", f"use one of {', '.join(EXPORT_TOOLS)}")


def _export(plan: Any, spec: Any, req: Any, profile: dict, identity: dict) -> Any:
    """The plan as llama.cpp flags (plan.export), its tensors named from the gguf package."""
    from hetegen_cli.models.formats.gguf_names import gguf_tensor_names
    from hetegen_cli.plan.costmodel.predict import CostInputs
    from hetegen_cli.plan.export import llama_cpp_export

    names = gguf_tensor_names(spec.architecture, spec.num_layers)
    return llama_cpp_export(plan, spec, req, CostInputs.of(profile, identity), names)


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


def _simulate(
    plan: Any, spec: Any, profile: dict, timeline: Path | None, use: Any = None
) -> tuple[Any, Path | None]:
    """The plan with its trace replay (plan.simulate.with_simulation, `use` the expert use it
    was made with), and the timeline drawn."""
    from hetegen_cli.plan.costmodel.fixed import fixed_costs_from_profile
    from hetegen_cli.plan.simulate import with_simulation
    from hetegen_cli.run.simulate import draw_timeline, record_trace

    cpu_experts = any(x.cpu for x in plan.experts)
    if not plan.runtime.requires_gpu or (plan.split_count == 0 and not cpu_experts):
        why = "an all-CPU plan" if not plan.runtime.requires_gpu else "plain GPU inference"
        warn(f"--simulate: this plan is {why}; there is no CPU/GPU pipeline to replay")
        if timeline is not None:
            warn(f"--timeline: nothing drawn, {timeline} not written")
        return plan, None
    with activity("recording the engine's operations on a proxy of the model"):
        trace, info = record_trace(plan, spec)
    fixed = fixed_costs_from_profile(profile)
    on_gpu = fixed is not None and fixed.has("cuda")
    plan, sims = with_simulation(plan, spec, trace, fixed_costs_on_gpu=on_gpu, recorded=info, use=use)
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
