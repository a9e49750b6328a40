"""`hetegen bench`: compare hetegen with pure offloading, Accelerate, a static layer split,
CPU-only and all-GPU on the same model, prompt and GPU budget (see docs/bench.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hetegen_cli.cli.common import (
    BenchDtypeOption,
    CpuDtypeOption,
    ExpertUseOption,
    JsonOption,
    cpu_dtype_arg,
    guarded,
    input_file_arg,
    model_setup_options,
    output_arg,
    sizes_bytes,
)
from hetegen_cli.core.console import emit_json, note, progress, stdout_console
from hetegen_cli.core.errors import InputError

if TYPE_CHECKING:
    from hetegen_cli.run.setup import ModelSetup


def check_outputs(output: Path | None, csv_path: Path | None, plot: Path | None) -> None:
    """InputError before any work: unwritable paths, the same path twice, no matplotlib."""
    given = [(p, f) for p, f in ((output, "--output"), (csv_path, "--csv"), (plot, "--plot")) if p]
    for path, flag in given:
        try:
            output_arg(path, flag)
        except InputError as exc:
            raise type(exc)(f"{flag}: {exc.message}", exc.hint) from None
    resolved = [Path(p).expanduser().resolve() for p, _ in given]
    if len(set(resolved)) != len(resolved):
        raise InputError("--output, --csv and --plot name the same file", "give each its own path")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise InputError(
            "--plot needs matplotlib, which is not installed",
            "pip install 'hetegen[bench]' (or matplotlib), or drop --plot",
        )


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @guarded
    @model_setup_options(plans=False, device=False, dtype_option=BenchDtypeOption)
    def bench_command(
        setup: ModelSetup,  # --model, --quant, --allow-float-copy, --dtype, --profile
        synthetic: str | None = typer.Option(
            None,
            "--synthetic",
            help="Benchmark a preset's shapes (e.g. opt-6.7b) with random "
            "weights, built once under $HETEGEN_HOME/models/synthetic.",
        ),
        synthetic_format: str | None = typer.Option(
            None,
            "--synthetic-format",
            help="How --synthetic is written: safetensors (random float weights), or "
            "gguf-q4_0, gguf-q4_1, gguf-q8_0, gguf-q4_k_m (one GGUF file that hetegen and llama.cpp "
            "both run; smollm2-* presets; q4_k_m is llama-quantize's Q4_K/Q6_K mix). "
            "Default: gguf when --arms names llama.cpp (Q8_0 for --quant "
            "int8, else Q4_0), else safetensors.",
        ),
        cpu_dtype: CpuDtypeOption = None,
        prompt_len: int = typer.Option(
            512,
            "--prompt-len",
            help="Prompt tokens (seeded random ids), as in the paper; on "
            "a CPU-only machine 32-128 keeps it short.",
        ),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generated tokens (>= 2)."),
        repeat: int = typer.Option(5, "--repeat", help="Timed runs per arm (>= 1)."),
        warmup: int = typer.Option(1, "--warmup", help="Discarded warm-up runs per arm."),
        arms: str | None = typer.Option(
            None,
            "--arms",
            help="Comma-separated subset of: hetegen, offload, accelerate, "
            "layer-split, experts-on-cpu, cpu, gpu, reference, llama.cpp. Default: all "
            "(reference only without CUDA, experts-on-cpu only for mixture-of-experts models).",
        ),
        gpu_memory: str | None = typer.Option(
            None,
            "--gpu-memory",
            help="GPU budget, or a comma-separated list to sweep, e.g. "
            "4GiB,8GiB,16GiB. Default: the profiled free memory.",
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the prompt ids (and synthetic weights)."),
        threads: int | None = typer.Option(
            None,
            "--threads",
            help="torch intra-op threads for every arm. Default: the profile's (the plan's cpu_threads).",
        ),
        expert_use: ExpertUseOption = None,
        json_: JsonOption = False,
        csv_path: Path | None = typer.Option(None, "--csv", help="Write one CSV row per (budget, arm)."),
        plot: Path | None = typer.Option(
            None, "--plot", help="Write a PNG of decode and end-to-end tok/s against GPU memory."
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Save the JSON document here (atomically)."
        ),
    ) -> None:
        """Benchmark hetegen against pure offloading, Accelerate, a static layer split, CPU-only
        and all-GPU: same model, prompt, budget and greedy tokens; warm-up, then mean ± sd."""
        from hetegen_cli.bench import present
        from hetegen_cli.bench.prepare import BenchOptions, parse_arms
        from hetegen_cli.bench.runner import run_bench
        from hetegen_cli.core.jsonio import atomic_write, write_document

        options = BenchOptions(
            setup=setup,
            synthetic=synthetic,
            synthetic_format=synthetic_format.lower() if synthetic_format else None,
            cpu_dtype=cpu_dtype_arg(cpu_dtype),
            prompt_len=prompt_len,
            max_new_tokens=max_new_tokens,
            repeat=repeat,
            warmup=warmup,
            arms=parse_arms(arms),
            gpu_budget_bytes=sizes_bytes(gpu_memory, "--gpu-memory"),
            seed=seed,
            threads=threads,
            expert_use_path=input_file_arg(expert_use, "--expert-use"),
            command_line=tuple(["hetegen", *sys.argv[1:]]),
        )
        check_outputs(output, csv_path, plot)
        # with --output the file is rewritten (atomically) after every arm: a run cut short
        # still leaves the rows it measured, marked "complete": false
        on_update = (lambda partial: write_document(output, partial)) if output is not None else None
        with progress(enabled=not json_) as bar:
            doc = run_bench(options, progress=bar, on_update=on_update)
        # files first (atomic), then stdout, so a failed write leaves stdout empty
        png = present.plot_png(doc) if plot is not None else None
        if output is not None:
            write_document(output, doc)
        if csv_path is not None:
            present.write_csv(doc, csv_path)
        if png is not None:
            atomic_write(plot, png)
        if json_:
            emit_json(doc)
        else:
            present.render(doc, stdout_console())
        for path, what in ((output, "JSON"), (csv_path, "CSV"), (plot, "plot")):
            if path is not None:
                note(f"bench {what} saved to {path}")
