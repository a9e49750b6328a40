"""Recording a trace for any plan, and drawing its replay (`hetegen plan --simulate`).

A plan works from shapes (a preset needs no weights), so its trace is recorded on a small
**proxy**: the plan's architecture with the same number of layers and the same linear names,
tiny widths (hidden 64, FFN 128, 4 heads, vocabulary 512), random float32 weights saved once as
safetensors under `$HETEGEN_HOME/proxies` (keyed by the proxy's config), loaded through the
engine's CUDA code path on the CPU (core.devices.CudaPathBackend: copies at once, events
complete, so the host times are the engine's own, not a stand-in's bookkeeping) with placements of the same
residency and mode as the plan's (plan rows scaled to the proxy's widths) and the plan's
staging buffers, prefetch depth and copy engines. engine.trace.trace_steps records one prefill
(of min(prompt, TRACE_PROMPT_CAP) tokens) and one decode step; plan.simulate replays them with
the plan's sizes and rates. The real model's weights are never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetegen_cli.core.errors import InputError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.core.paths import home
from hetegen_cli.models.formats.synthetic import building, is_built
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement, Plan, RuntimeSettings
from hetegen_cli.plan.replay import D2H, GPU, H2D_SHARED, HOST, Replay
from hetegen_cli.plan.simulate import KINDS, TRACE_PROMPT_CAP

PROXY = {"hidden_size": 64, "ffn": 128, "num_heads": 4, "vocab_size": 512, "expert_ffn": 64}
#: config keys of a routed expert's width: its own key, else (mixtral, olmoe) intermediate_size
_EXPERT_WIDTH = "moe_intermediate_size"
_EXPERT_COUNT = ("num_experts", "num_local_experts")
_DROP = ("quantization_config", "torch_dtype", "dtype", "auto_map", "transformers_version", "_name_or_path")


def proxy_config(config: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    """The proxy of a model config: the same architecture, layers and linear names, tiny widths
    (PROXY), float32, positions for `prompt_len` + 8 tokens."""
    cfg = {k: v for k, v in config.items() if k not in _DROP}
    arch = cfg["model_type"]
    heads = PROXY["num_heads"]
    cfg.update(
        hidden_size=PROXY["hidden_size"],
        num_attention_heads=heads,
        vocab_size=PROXY["vocab_size"],
        max_position_embeddings=int(prompt_len) + 8,
        dtype="float32",
    )
    if arch == "opt":
        proj = config.get("word_embed_proj_dim") or config["hidden_size"]
        cfg.update(ffn_dim=PROXY["ffn"], word_embed_proj_dim=64 if proj == config["hidden_size"] else 32)
    else:
        ratio = max(1, config["num_attention_heads"] // (config.get("num_key_value_heads") or heads))
        kv = max(1, heads // ratio)
        while heads % kv:
            kv -= 1
        cfg.update(intermediate_size=PROXY["ffn"], num_key_value_heads=kv)
        if any(config.get(k) for k in _EXPERT_COUNT):  # experts: the same count and top-k, narrow
            cfg[_EXPERT_WIDTH if _EXPERT_WIDTH in config else "intermediate_size"] = PROXY["expert_ffn"]
            if config.get("shared_expert_intermediate_size"):
                cfg["shared_expert_intermediate_size"] = PROXY["ffn"]
        if "head_dim" in config:
            cfg["head_dim"] = PROXY["hidden_size"] // heads
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids inside the tiny vocabulary
        value = cfg.get(key)
        if isinstance(value, int) and value >= PROXY["vocab_size"]:
            cfg[key] = 2
        elif isinstance(value, list):
            cfg[key] = [v if v < PROXY["vocab_size"] else 2 for v in value]
    return cfg


def proxy_folder(config: dict[str, Any], seed: int = 0) -> Path:
    """A folder with the proxy's config.json and random float32 weights (made once, reused)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    key = f"{config['model_type']}-{config['num_hidden_layers']}l-{digest}-{seed}"
    root = home() / "proxies"
    folder = root / key
    if is_built(folder):
        return folder
    try:
        with building(folder, root / f".{key}.tmp-{os.getpid()}") as tmp:
            torch.manual_seed(seed)
            cfg = AutoConfig.for_model(**config)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Writing model shards": not the user's business
            try:
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    except OSError as exc:
        raise InputError(
            f"cannot write the trace proxy under {root}: {exc.strerror or exc}",
            "set HETEGEN_HOME to a writable folder",
        ) from exc
    return folder


def _scaled(k: int, out: int, proxy_out: int) -> int:
    """Rows of a proxy linear for `k` of `out` rows: 0 and all stay exact, a split stays split."""
    if k <= 0:
        return 0
    if k >= out:
        return proxy_out
    return min(proxy_out - 1, max(1, round(k / out * proxy_out)))


def proxy_placements(plan: Plan, proxy: ModelSpec) -> list[LinearPlacement]:
    """The plan's placements on the proxy: the same names, residency and mode per phase (all
    CPU, all GPU or split), split rows scaled to the proxy's widths, and the order of the two
    phases' rows kept where it can be (it decides whether prefill re-issues a staged copy)."""
    shapes = {lin.name: lin for lin in (*proxy.linears, proxy.lm_head)}
    out = []
    for p in plan.placements:
        lin = shapes.get(p.name)
        if lin is None:
            raise InputError(f"the trace proxy has no linear {p.name}", "the plan was made for another model")
        n = lin.out_features
        if p.resident:
            out.append(LinearPlacement(p.name, p.layer_index, p.role, n, lin.in_features, True, 0, 0))
            continue
        pre = _scaled(p.cpu_rows_prefill, p.out_features, n)
        dec = _scaled(p.cpu_rows_decode, p.out_features, n)
        both_split = 0 < min(p.cpu_rows_prefill, p.cpu_rows_decode) <= p.max_cpu_rows < p.out_features
        if both_split and pre == dec:
            if p.cpu_rows_prefill < p.cpu_rows_decode:
                pre, dec = (pre - 1, dec) if pre > 1 else (pre, dec + 1) if dec < n - 1 else (pre, dec)
            elif p.cpu_rows_prefill > p.cpu_rows_decode:
                pre, dec = (pre, dec - 1) if dec > 1 else (pre + 1, dec) if pre < n - 1 else (pre, dec)
        out.append(LinearPlacement(p.name, p.layer_index, p.role, n, lin.in_features, False, pre, dec))
    return out


def proxy_experts(plan: Plan, proxy: ModelSpec) -> list[ExpertsPlacement]:
    """The plan's expert placements on the proxy: the same experts on the GPU side and the same
    prefill streaming; a decode split stays a split (the proxy's smallest one)."""
    widths = {x.name: x for x in proxy.experts}
    out = []
    for p in plan.experts:
        x = widths.get(p.name)
        if x is None or x.num_experts != p.num_experts:
            raise InputError(
                f"the trace proxy has no experts {p.name}", "the plan was made for another model"
            )
        units = x.split_step if p.split_units and x.split_step < x.intermediate_size else 0
        out.append(replace(p, split_units=units))
    return out


def record_trace(
    plan: Plan, spec: ModelSpec, *, copy_engines: int | None = None, seed: int = 0
) -> tuple[dict, dict]:
    """(trace document, where and how it was recorded) for `plan` of the model `spec`, on its
    proxy (module docstring)."""
    import torch
    from transformers.utils import logging as hf_logging

    from hetegen_cli.core.devices import CudaPathBackend
    from hetegen_cli.engine.hetero_model import load_hetero_model
    from hetegen_cli.engine.trace import trace_steps
    from hetegen_cli.measure.cpu import cpuinfo
    from hetegen_cli.models.loading.source import resolve_model

    if not spec.config:
        raise InputError(
            f"{spec.name} has no config to build a trace proxy from", "plan from a preset or folder"
        )
    prompt = min(int(plan.workload.prompt_len), TRACE_PROMPT_CAP)
    config = proxy_config(spec.config, prompt)
    folder = proxy_folder(config, seed)
    ref = resolve_model(str(folder), need_weights=True, dtype="float32")
    same_experts = [(x.name, x.num_experts, x.top_k) for x in ref.spec.experts] == [
        (x.name, x.num_experts, x.top_k) for x in spec.experts
    ]
    if [lin.name for lin in ref.spec.linears] != [lin.name for lin in spec.linears] or not same_experts:
        raise InputError(
            f"the trace proxy of {spec.name} does not have the model's linears",
            "this architecture is not supported by --simulate",
        )
    rt = plan.runtime
    engines = copy_engines or rt.copy_engines
    runtime = RuntimeSettings(
        weights_dtype="float32",
        cpu_dtype_prefill="float32",
        cpu_dtype_decode="float32",
        cpu_threads=1,
        staging_buffers=max(1, rt.staging_buffers),
        prefetch_depth=rt.prefetch_depth,
        pin_weights=True,
        lm_head_on_gpu=rt.lm_head_on_gpu,
        requires_gpu=True,
        copy_engines=engines,
    )
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        with load_hetero_model(
            ref,
            proxy_placements(plan, ref.spec),
            runtime,
            CudaPathBackend(),
            progress=False,
            experts=proxy_experts(plan, ref.spec),
        ) as loaded:
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():  # transformers' deprecation notes on its cache API
                    warnings.simplefilter("ignore", FutureWarning)
                    trace = trace_steps(loaded.model, prompt, ref.spec.vocab_size, seed=seed)
            finally:
                hf_logging.set_verbosity(verbosity)
    finally:
        torch.set_num_threads(threads)
    info = {
        "backend": trace["backend"],
        "machine_cpu": cpuinfo()[0] or platform.processor() or platform.machine() or "unknown",
        "logical_cores": os.cpu_count(),
        "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "record_s": time.perf_counter() - start,
        "prompt_len": prompt,
        "prompt_len_capped": prompt < int(plan.workload.prompt_len),
        "proxy": {
            "num_layers": ref.spec.num_layers,
            "hidden_size": ref.spec.hidden_size,
            "ffn": PROXY["ffn"],
            **({"expert_ffn": ref.spec.experts[0].intermediate_size} if ref.spec.experts else {}),
            "num_heads": ref.spec.num_heads,
            "num_kv_heads": ref.spec.num_kv_heads,
            "vocab_size": ref.spec.vocab_size,
            "dtype": "float32",
            "cpu_threads": 1,
        },
        "copy_engines": engines,
        "ops": {phase: len(ops) for phase, ops in trace["phases"].items()},
    }
    return trace, info


# --- the timeline ---------------------------------------------------------------------------

_COLOURS = {
    "host": "#9e9e9e",
    "cpu": "#ff9800",
    "blocked": "#eeeeee",
    "weight copy": "#1e88e5",
    "y copy": "#43a047",
    "x copy": "#8e24aa",
    "matmul": "#e53935",
    "resident": "#b71c1c",
    "attention": "#6d4c41",
    "lm head": "#212121",
    "bias": "#f06292",
    "expert copy": "#00acc1",
    "experts": "#fdd835",
}
_LANE_NAMES = {
    HOST: "main thread",
    H2D_SHARED: "H2D copy engine",
    "h2d:copy": "H2D engine (weights)",
    "h2d:compute": "H2D engine (CPU results)",
    D2H: "D2H copy engine",
    GPU: "GPU",
}
_LEGEND = {
    "host": "host work",
    "cpu": "CPU share",
    "blocked": "host blocked",
    "weight copy": "weight copy",
    "y copy": "CPU result to GPU",
    "x copy": "layer input to host",
    "matmul": "GPU matmul (split)",
    "resident": "GPU matmul (resident)",
    "attention": "attention",
    "lm head": "LM head",
    "bias": "bias",
    "expert copy": "expert weight copy",
    "experts": "GPU experts",
}


def check_matplotlib() -> None:
    """InputError now, before any work, when matplotlib (the `bench` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "--timeline needs matplotlib, which is not installed", "pip install matplotlib"
        ) from exc


def draw_timeline(result: Replay, path: str | Path, title: str) -> Path:
    """One replayed step as lanes (main thread, copy engines, GPU), coloured by op kind, time
    in ms; written atomically as a PNG. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    lanes = [lane for lane in (HOST, H2D_SHARED, "h2d:copy", "h2d:compute", D2H, GPU) if lane in result.lanes]
    rows = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(14, 1.8 + 0.6 * len(lanes)), dpi=110)
    seen = []
    for kind in KINDS:
        for lane in lanes:
            spans = [
                (i.start * 1e3, (i.end - i.start) * 1e3)
                for i in result.intervals()
                if i.lane == lane and i.kind == kind
            ]
            if spans:
                ax.broken_barh(spans, (rows[lane] - 0.35, 0.7), facecolors=_COLOURS[kind], linewidth=0)
                if kind not in seen:
                    seen.append(kind)
    ax.set_yticks([rows[lane] for lane in lanes], [_LANE_NAMES.get(lane, lane) for lane in lanes])
    ax.set_xlim(0, result.step_s * 1e3 if result.step_s > 0 else 1.0)
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=[Patch(color=_COLOURS[k], label=_LEGEND[k]) for k in seen],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=min(6, len(seen)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())
