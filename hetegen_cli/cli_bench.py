"""`hetegen bench`: compare hetegen with pure offloading, Accelerate, a static layer split,
CPU-only and all-GPU on the same model, prompt and GPU budget (see docs/bench.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Optional

import typer

from hetegen_cli.cli_common import MODEL_HELP, guarded


def check_outputs(output: Optional[Path], csv_path: Optional[Path], plot: Optional[Path]) -> None:
    """InputError before any work: unwritable paths, the same path twice, no matplotlib."""
    from hetegen_cli.errors import InputError
    from hetegen_cli.profile_doc import check_output_path

    given = [(p, f) for p, f in ((output, "--output"), (csv_path, "--csv"), (plot, "--plot")) if p]
    for path, flag in given:
        try:
            check_output_path(path)
        except InputError as exc:
            raise InputError(f"{flag}: {exc.message}", exc.hint) from None
    resolved = [Path(p).expanduser().resolve() for p, _ in given]
    if len(set(resolved)) != len(resolved):
        raise InputError("--output, --csv and --plot name the same file", "give each its own path")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib, which is not installed",
                         "pip install 'hetegen[bench]' (or matplotlib), or drop --plot")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @guarded
    def bench_command(
        model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        synthetic: Optional[str] = typer.Option(
            None, "--synthetic", help="Benchmark a preset's shapes (e.g. opt-6.7b) with random "
                                      "weights, built once under $HETEGEN_HOME/models/synthetic."),
        dtype: Optional[str] = typer.Option(
            None, "--dtype", help="Weights dtype (float16, bfloat16, float32). Default: the "
                                  "model's (--synthetic: the preset's)."),
        cpu_dtype: Optional[str] = typer.Option(
            None, "--cpu-dtype", help="Dtype of the CPU share and the cpu arm. Default: the "
                                      "profile's fastest GEMV dtype."),
        profile: Optional[Path] = typer.Option(
            None, "--profile", help="Hardware profile JSON. Default: the saved profile, "
                                    "measured with `profile --quick` if missing."),
        prompt_len: int = typer.Option(
            512, "--prompt-len", help="Prompt tokens (seeded random ids), as in the paper; on "
                                      "a CPU-only machine 32-128 keeps it short."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generated tokens (>= 2)."),
        repeat: int = typer.Option(5, "--repeat", help="Timed runs per arm (>= 1)."),
        warmup: int = typer.Option(1, "--warmup", help="Discarded warm-up runs per arm."),
        arms: Optional[str] = typer.Option(
            None, "--arms", help="Comma-separated subset of: hetegen, offload, accelerate, "
                                 "layer-split, cpu, gpu, reference. Default: all (reference "
                                 "only without CUDA)."),
        gpu_memory: Optional[str] = typer.Option(
            None, "--gpu-memory", help="GPU budget, or a comma-separated list to sweep, e.g. "
                                       "4GiB,8GiB,16GiB. Default: the profiled free memory."),
        seed: int = typer.Option(0, "--seed", help="Seed of the prompt ids (and synthetic weights)."),
        threads: Optional[int] = typer.Option(
            None, "--threads", help="torch intra-op threads for every arm. Default: the "
                                    "profile's (the plan's cpu_threads)."),
        json_: bool = typer.Option(False, "--json", help="Print one JSON document with raw samples."),
        csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV row per (budget, arm)."),
        plot: Optional[Path] = typer.Option(
            None, "--plot", help="Write a PNG of decode and end-to-end tok/s against GPU memory."),
        output: Optional[Path] = typer.Option(None, "--output", "-o",
                                              help="Save the JSON document here (atomically)."),
    ) -> None:
        """Benchmark hetegen against pure offloading, Accelerate, a static layer split, CPU-only
        and all-GPU: same model, prompt, budget and greedy tokens; warm-up, then mean ± sd."""
        from hetegen_cli import bench, bench_report
        from hetegen_cli.jsonio import write_document
        from hetegen_cli.output import emit_json, note, progress, stdout_console

        options = bench.BenchOptions(
            model=model, synthetic=synthetic, dtype=dtype, cpu_dtype=cpu_dtype, profile=profile,
            prompt_len=prompt_len, max_new_tokens=max_new_tokens, repeat=repeat, warmup=warmup,
            arms=bench.parse_arms(arms), gpu_memory=bench.parse_budgets(gpu_memory), seed=seed, threads=threads,
            command_line=tuple(["hetegen", *sys.argv[1:]]))
        bench.validate_options(options)
        check_outputs(output, csv_path, plot)
        with progress(enabled=not json_) as bar:
            doc = bench.run_bench(options, progress=bar)
        # files first (atomic), then stdout, so a failed write leaves stdout empty
        png = bench_report.plot_png(doc) if plot is not None else None
        if output is not None:
            write_document(output, doc)
        if csv_path is not None:
            bench_report.write_csv(doc, csv_path)
        if png is not None:
            bench_report.atomic_write_bytes(plot, png)
        if json_:
            emit_json(doc)
        else:
            bench_report.render(doc, stdout_console())
        for path, what in ((output, "JSON"), (csv_path, "CSV"), (plot, "plot")):
            if path is not None:
                note(f"bench {what} saved to {path}")
