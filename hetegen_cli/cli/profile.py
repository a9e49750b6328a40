"""`hetegen profile`: measure this machine and save the hardware profile the planner reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hetegen_cli.cli.common import JsonOption, guarded, output_arg
from hetegen_cli.core.console import emit_json, note, progress, stdout_console, table, warn
from hetegen_cli.core.jsonio import check_output_path
from hetegen_cli.core.units import format_bytes, format_flops, format_rate


def register(app: typer.Typer) -> None:
    @app.command("profile")
    @guarded
    def profile_command(
        quick: bool = typer.Option(
            False, "--quick", help="Fewer, smaller measurements (under a minute on 2 cores)."
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            help="Where to save the profile JSON. Default: $HETEGEN_HOME/profile.json.",
        ),
        json_: JsonOption = False,
        threads: int | None = typer.Option(
            None, "--threads", help="CPU threads for the matmuls (default: physical cores)."
        ),
        repeat: int | None = typer.Option(
            None, "--repeat", help="Timed repetitions per measurement (default: 3 with --quick, else 5)."
        ),
        no_engine_costs: bool = typer.Option(
            False,
            "--no-engine-costs",
            help="Skip the engine's fixed costs (the planner then predicts without them).",
        ),
    ) -> None:
        """Measure CPU memory bandwidth, CPU GEMV/GEMM rates per dtype and, with a CUDA GPU,
        GPU matmul, PCIe copies, CPU/PCIe concurrency and the copy engines; then the engine's
        fixed costs. Save them as a versioned profile: first without the engine's costs, then
        with them (or with why they failed: `engine_error`)."""
        from hetegen_cli.core import paths
        from hetegen_cli.measure.profile import run_profile, with_engine_costs
        from hetegen_cli.profile.document import busy_warning, save_profile

        path = output_arg(output) or check_output_path(paths.default_profile_path())
        with progress(enabled=not json_) as bar:
            doc = run_profile(quick=quick, threads=threads, repeat=repeat, progress=bar)
        saved = save_profile(doc, path)  # kept whatever the engine-cost measurement does
        if not no_engine_costs:
            note(f"profile saved to {saved}; measuring the engine's fixed costs")
            doc = with_engine_costs(doc, quick)
            saved = save_profile(doc, path)
        if json_:
            emit_json(doc)
        else:
            render(doc)
        warning = busy_warning(doc)
        if warning:  # recorded in the document too: plan, run and bench repeat it
            warn(warning)
        if doc["cpu"]["threads"] > doc["host"]["logical_cores"]:
            warn(
                f"--threads {doc['cpu']['threads']} exceeds the {doc['host']['logical_cores']} logical cores"
            )
        if doc["gpu_note"]:
            note(doc["gpu_note"])
        note(f"profile saved to {saved}")


def _ms(s: dict[str, Any]) -> str:
    """'1.234 ± 0.050' (milliseconds) from a stats dict in seconds."""
    return f"{s['mean'] * 1e3:.3f} ± {s['sd'] * 1e3:.3f}"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _gb(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f}"


def _shape(m: dict[str, Any]) -> str:
    return f"{m['out_features']}x{m['in_features']}"


def _table(title: str, *columns: str) -> Any:
    return table(title, columns)


def render(doc: dict[str, Any]) -> None:
    """The profile as Rich tables on stdout."""
    console = stdout_console()
    host, cpu, gpu = doc["host"], doc["cpu"], doc["gpu"]
    features = [name for name, ok in host["features"].items() if ok] or ["none detected"]
    t = _table("Host", "item", "value")
    t.columns[1].justify = "left"
    for key, value in (
        ("CPU", host["cpu_model"]),
        ("cores", f"{host['physical_cores']} physical, {host['logical_cores']} logical"),
        (
            "RAM",
            f"{format_bytes(host['ram_total_bytes'])} total, "
            f"{format_bytes(host['ram_available_bytes'])} available",
        ),
        ("CPU features", " ".join(features)),
        ("torch CPU capability", host.get("torch_cpu_capability", "?")),
        ("OS", host["os"]),
        ("Python, torch", f"{host['python']}, {host['torch']}"),
    ):
        t.add_row(key, str(value))
    console.print(t)

    mem = cpu["memory_read_bytes_per_s"]
    console.print(
        f"CPU memory read: {format_rate(mem['mean'])} ± {mem['sd'] / 1e9:.1f} ({_threads(cpu['threads'])})",
        highlight=False,
    )
    t = _table(
        f"CPU GEMV, decode (1 token, {_threads(cpu['threads'])})",
        "dtype",
        "out x in",
        "MiB",
        "ms/call",
        "GB/s",
        "Gparam/s",
    )
    for g in cpu["gemv"]:
        best = " *" if g["dtype"] == cpu["best_gemv_dtype"] else ""
        t.add_row(
            g["dtype"] + best,
            _shape(g),
            f"{g['weight_bytes'] / 2**20:.1f}",
            _ms(g["seconds"]),
            _gb(g["weight_bytes_per_s"]),
            f"{g['params_per_s'] / 1e9:.2f}",
        )
    t.caption = f"* best CPU GEMV dtype: {cpu['best_gemv_dtype']} (params/s, largest shape)"
    console.print(t)
    if cpu.get("quant_gemv"):
        float_rate = {
            (g["out_features"], g["in_features"], g["dtype"]): g["params_per_s"] for g in cpu["gemv"]
        }
        t = _table(
            f"CPU GEMV, quantized weights (1 token, bfloat16 activations, {_threads(cpu['threads'])})",
            "format",
            "out x in",
            "MiB",
            "ms/call",
            "Gparam/s",
            "x float16",
        )
        for g in cpu["quant_gemv"]:
            f16 = float_rate.get((g["out_features"], g["in_features"], "float16"))
            t.add_row(
                g["format"] + (f" g{g['group_size']}" if g.get("group_size") else ""),
                _shape(g),
                f"{g['weight_bytes'] / 2**20:.1f}",
                _ms(g["seconds"]),
                f"{g['params_per_s'] / 1e9:.2f}",
                f"{g['params_per_s'] / f16:.2f}x" if f16 else "-",
            )
        console.print(t)
    t = _table(
        f"CPU GEMM, prefill ({_threads(cpu['threads'])})", "dtype", "tokens", "out x in", "ms/call", "FLOP/s"
    )
    for g in cpu["gemm"]:
        t.add_row(g["dtype"], str(g["tokens"]), _shape(g), _ms(g["seconds"]), format_flops(g["flops_per_s"]))
    if cpu.get("prompt_gemm"):
        chosen = ", ".join(f"{cls} {backend}" for cls, backend in cpu["prompt_gemm"].items())
        t.caption = f"quantized prompt products' float32 GEMM (weights/prompt): {chosen}"
    console.print(t)
    if cpu["thread_sweep"]:
        t = _table("CPU GEMV thread sweep", "threads", "dtype", "out x in", "GB/s")
        for s in cpu["thread_sweep"]:
            t.add_row(str(s["threads"]), s["dtype"], _shape(s), _gb(s["weight_bytes_per_s"]))
        console.print(t)
    if gpu is None:
        console.print("GPU: none (no CUDA GPU found)", highlight=False)
    else:
        _render_gpu(console, gpu)
    if doc.get("engine"):
        _render_engine(console, doc["engine"])
    elif doc.get("engine_error"):
        e = doc["engine_error"]
        console.print(f"Engine fixed costs: not measured ({e['type']}: {e['message']})", highlight=False)


def _render_engine(console: Any, engine: dict[str, Any]) -> None:
    """The engine's fixed costs: per device, dtype, family and weights, at the smallest and
    largest measured prompt and context; and the engine's cost per linear."""
    t = _table(
        "Engine fixed costs (tiny models; non-linear work per decoder layer and per step, ms; "
        "int4 decode includes its linears)",
        "device",
        "dtype",
        "family",
        "weights",
        "prefill layer",
        "prefill step",
        "decode layer",
        "decode step",
    )
    for e in engine["entries"]:
        pre, dec = e["prefill"], e["decode"]

        def span(points: list[dict], key: str) -> str:
            return f"{points[0][key] * 1e3:.3f} .. {points[-1][key] * 1e3:.3f}"

        t.add_row(
            e["device"],
            e["dtype"],
            e["architecture"],
            e.get("weights", "float"),
            span(pre, "layer_s"),
            span(pre, "token_s"),
            span(dec, "layer_s"),
            span(dec, "token_s"),
        )
    pre, dec = engine["entries"][0]["prefill"], engine["entries"][0]["decode"]
    t.caption = (
        f"prefill at {pre[0]['tokens']} .. {pre[-1]['tokens']} tokens, decode at context "
        f"{dec[0]['context']} .. {dec[-1]['context']}; measured in {engine.get('seconds', 0):.1f} s"
    )
    console.print(t)
    rows = [(e, m, v) for e in engine["entries"] for m, v in (e.get("linear_s") or {}).items()]
    if rows:
        t = _table(
            "Engine cost per linear (us, over a plain nn.Linear)", "device", "mode", "prefill", "decode"
        )
        for e, mode, v in rows:
            t.add_row(e["device"], mode, f"{v['prefill'] * 1e6:.1f}", f"{v['decode'] * 1e6:.1f}")
        console.print(t)


def _render_gpu(console: Any, gpu: dict[str, Any]) -> None:
    console.print(
        f"GPU: {gpu['name']}, compute capability {gpu['compute_capability']}, "
        f"{format_bytes(gpu['total_memory_bytes'])} total, "
        f"{format_bytes(gpu['free_memory_bytes'])} free",
        highlight=False,
    )
    t = _table("GPU GEMM, prefill", "dtype", "tokens", "out x in", "ms/call", "FLOP/s")
    for g in gpu["gemm"]:
        t.add_row(g["dtype"], str(g["tokens"]), _shape(g), _ms(g["seconds"]), format_flops(g["flops_per_s"]))
    console.print(t)
    t = _table("GPU GEMV, decode", "dtype", "out x in", "ms/call", "GB/s")
    for g in gpu["gemv"]:
        t.add_row(g["dtype"], _shape(g), _ms(g["seconds"]), _gb(g["weight_bytes_per_s"]))
    console.print(t)
    t = _table("Host <-> GPU copies", "direction", "host memory", "size", "ms/copy", "GB/s")
    for c in gpu["transfers"]:
        t.add_row(
            c["direction"].upper(),
            c["memory"],
            format_bytes(c["size_bytes"]),
            _ms(c["seconds"]),
            _gb(c["bytes_per_s"]),
        )
    console.print(t)
    c = gpu["concurrent"]
    t = _table(
        f"Concurrency: pinned H2D of {format_bytes(c['size_bytes'])} while the CPU runs a {c['dtype']} GEMV",
        "rate",
        "alone",
        "together",
    )
    t.add_row("H2D", format_rate(c["h2d_alone_bytes_per_s"]), format_rate(c["h2d_bytes_per_s"]))
    t.add_row(
        "CPU GEMV weights read",
        format_rate(c["cpu_gemv_alone_weight_bytes_per_s"]),
        format_rate(c["cpu_gemv_weight_bytes_per_s"]),
    )
    console.print(t)
    if gpu.get("copy_engine_probe"):
        _render_probe(console, gpu["copy_engine_probe"])
    elif gpu.get("copy_engine_probe_error"):
        console.print(f"Copy engines: the probe failed ({gpu['copy_engine_probe_error']})", highlight=False)


#: what the copy-engine probe's answer means for the engine
_ENGINES = {
    1: "one copy engine for host-to-GPU copies: a small copy waits behind a big one",
    2: "separate copy engines: a small copy overlaps a big one",
    None: "undetermined: the big copy had ended before the small one started",
}


def _render_probe(console: Any, probe: dict[str, Any]) -> None:
    small = format_bytes(probe.get("small_copy_bytes") or 16384)
    big = format_bytes(probe["big_copy_bytes"]) if probe.get("big_copy_bytes") else "the big copy"
    t = _table("Copy engines: pinned host-to-GPU copies", "copy", "ms")
    t.add_row(f"{small} alone", f"{probe['small_copy_alone_s'] * 1e3:.3f}")
    t.add_row(f"{small} during {big} on another stream", f"{probe['small_copy_during_big_s'] * 1e3:.3f}")
    t.add_row(f"{big} alone", f"{probe['big_copy_s'] * 1e3:.3f}")
    t.caption = _ENGINES[probe["h2d_copy_engines"]]
    console.print(t)
