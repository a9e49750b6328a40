"""`hetegen bench`: the same model, prompt and GPU budget through several strategies ("arms").

Library entry point: `run_bench(BenchOptions(...)) -> dict` (the "hetegen.bench" document).

Method (docs/bench.md): every arm gets the same seeded random prompt ids of `prompt_len`
tokens and decodes `max_new_tokens` greedily with EOS ignored, through one generation loop
(run.generate, synchronising clock). `warmup` discarded runs, then `repeat` timed runs;
raw samples are kept. Host peak memory: process RSS sampled every 10 ms by a background thread
from before the arm loads until it is closed. GPU peak: torch's peak allocated bytes.
Arms are run by an injectable table (`runners`), so the report logic is testable with fakes.
"""

from __future__ import annotations

import copy
import gc
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetegen_cli import __version__
from hetegen_cli.bench import arms as bench_arms
from hetegen_cli.bench import report
from hetegen_cli.bench.arms import ArmContext
from hetegen_cli.bench.predicted import predicted_for_arm
from hetegen_cli.bench.prepare import BenchOptions, Prepared, prepare
from hetegen_cli.bench.timing import RSS_INTERVAL_S, RssSampler, timed_runs
from hetegen_cli.core.console import activity, note
from hetegen_cli.core.devices import get_backend, out_of_memory_as_error
from hetegen_cli.core.errors import HetegenError
from hetegen_cli.profile.document import profile_sections

BENCH_KIND = "hetegen.bench"
BENCH_SCHEMA_VERSION = 1


@dataclass
class ArmRun:
    """Raw result of one arm: per-run timings, greedy tokens (of the check run; tokens_stable:
    every timed run produced them too), memory peaks, loader info."""

    samples: list[dict]
    tokens: list[int]
    tokens_stable: bool
    gpu_peak_memory_bytes: int | None
    host_peak_rss_bytes: int | None
    host_rss_before_bytes: int | None
    info: dict = field(default_factory=dict)
    engine_stats: dict | None = None
    logits: dict | None = None  # top2_ids, margins, top1_logits per generated token (check run)
    host_peak_anon_bytes: int | None = None  # the peak's anonymous part (timing.RssSampler)


Runner = Callable[[ArmContext, Prepared], ArmRun]


# --- measurement -------------------------------------------------------------------------


def run_arm(ctx: ArmContext, prepared: Prepared, on_run: Callable[[], None] | None = None) -> ArmRun:
    """The default runner: build the arm, time it, close it; peaks measured around it all."""
    backend = get_backend("cuda") if prepared.has_cuda else None
    o = prepared.options
    gc.collect()
    if backend:
        backend.reset_peak_memory()
    with RssSampler() as rss:
        with out_of_memory_as_error(f"loading the {ctx.arm} arm"):
            arm = bench_arms.BUILDERS[ctx.arm](ctx)
        built = arm.loaded
        load_peak = backend.peak_memory_bytes() if backend else None
        if backend:
            backend.reset_peak_memory()  # from here: the running peak (weights + KV + work)
        try:
            samples, tokens, check = timed_runs(
                built, prepared.prompt_ids, o.max_new_tokens, o.warmup, o.repeat, on_run
            )
            stats = built.stats()
        finally:
            built.close()
            del built.model
    gc.collect()
    return ArmRun(
        samples,
        check["tokens"],
        all(t == check["tokens"] for t in tokens),
        backend.peak_memory_bytes() if backend else None,
        rss.peak,
        rss.before,
        {**arm.info(), "gpu_load_peak_memory_bytes": load_peak},
        stats,
        check,
        rss.peak_anon,
    )


# --- the benchmark -----------------------------------------------------------------------


def versions() -> dict:
    from importlib import metadata

    out = {"hetegen": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "matplotlib", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run_bench(
    options: BenchOptions,
    runners: dict[str, Runner] | None = None,
    progress: Any = None,
    prepared: Prepared | None = None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Run every requested arm at every budget; return the "hetegen.bench" document.

    `runners` maps arm name -> runner(ctx, prepared) -> ArmRun (default: run_arm) so tests can
    inject fake measurements. Any failure inside one arm (out of memory, a CUDA error, a load
    error) marks that arm "failed" with its type, message and traceback tail, and the
    benchmark goes on. `on_update(doc)` receives the finished-so-far document after every arm
    (`"complete": false` until the last), so a run cut short still leaves its rows.
    """
    p = prepared or prepare(options, progress)
    o, runners = p.options, runners or {}
    task = (
        progress.add_task("bench", total=len(p.cases) * len(p.arms) * (o.warmup + o.repeat))
        if progress
        else None
    )
    done: dict[str, tuple[int, dict]] = {}
    doc = _skeleton(p)
    for index, case in enumerate(p.cases):
        entries: list[dict] = []
        doc["budgets"].append(report.budget_section(case, entries, p.ref.spec))
        threads = (
            case.plan.runtime.cpu_threads if case.plan else (o.threads or int(p.profile["cpu"]["threads"]))
        )
        for arm in run_order(p):
            ctx = ArmContext(
                arm,
                p.ref,
                case.plan,
                case.plan_error,
                case.gpu_budget_bytes,
                p.has_cuda,
                threads,
                {"prompt_len": o.prompt_len, "max_new_tokens": o.max_new_tokens},
                p.cpu_plan,
                p.cpu_ref,
                p.gguf,
                case.moe_plan,
                case.moe_plan_error,
            )
            entries.append(_one_arm(ctx, p, runners, done, index, progress, task))
            if on_update is not None:
                on_update(report.finish(copy.deepcopy(doc)))
    doc["complete"] = True
    return report.finish(doc)


def run_order(p: Prepared) -> list[str]:
    """The arms in the order they run: as --arms names them (a caller with little time puts
    the baseline it needs most first), else prepare.RUN_ORDER."""
    if p.options.arms:
        return [a for a in p.options.arms if a in p.arms]
    return list(p.arms)


def _skeleton(p: Prepared) -> dict:
    """The document before any arm ran (`complete` false, no budgets yet)."""
    o = p.options
    return {
        "schema_version": BENCH_SCHEMA_VERSION,
        "kind": BENCH_KIND,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command_line": list(o.command_line or sys.argv),
        "complete": False,
        "model": p.model_doc,
        "workload": {
            "prompt_len": o.prompt_len,
            "max_new_tokens": o.max_new_tokens,
            "batch_size": 1,
            "decoding": "greedy, EOS ignored",
            "prompt_seed": o.seed,
            "prompt_token_ids": p.prompt_ids,
        },
        "method": {
            "warmup_runs": o.warmup,
            "repeat": o.repeat,
            "timer": "time.perf_counter after device synchronisation (run.generate)",
            "host_memory": f"process RSS sampled every {RSS_INTERVAL_S * 1e3:.0f} ms by a "
            "background thread from before loading the arm until it is closed",
            "gpu_memory": "torch peak allocated bytes while generating (reset after "
            "loading; the loading peak is info.gpu_load_peak_memory_bytes; "
            "CUDA context excluded)",
            "sd": "sample standard deviation (n-1)",
        },
        "provenance": {
            "profile": p.profile_identity,
            "has_cuda": p.has_cuda,
            "cpu_model": profile_sections(p.profile).host.cpu_model,
            "profile_threads": profile_sections(p.profile).cpu.threads,
            "versions": versions(),
            "platform": platform.platform(),
        },
        "arms_requested": list(p.arms),
        "cpu_plan": p.cpu_plan.summary() if p.cpu_plan else None,
        "cpu_plan_error": p.cpu_plan_error,
        "budgets": [],
    }


def _one_arm(
    ctx: ArmContext, p: Prepared, runners: dict, done: dict, index: int, progress: Any, task: Any
) -> dict:
    o = p.options
    advance = (lambda: progress.advance(task)) if progress else None
    reason = bench_arms.skip_reason(ctx)
    if reason:
        if advance:
            progress.advance(task, o.warmup + o.repeat)
        return {"arm": ctx.arm, "status": "skipped", "reason": reason}
    key = bench_arms.cache_key(ctx)
    if key in done:
        if advance:
            progress.advance(task, o.warmup + o.repeat)
        first, entry = done[key]
        return {**entry, "reused_from_budget_index": first}
    if progress:
        progress.update(task, description=f"bench: {ctx.arm}")
    runner = runners.get(ctx.arm) or (lambda c, prep: run_arm(c, prep, advance))
    try:
        with activity(f"benchmarking the {ctx.arm} arm"):
            run = runner(ctx, p)
    except HetegenError as exc:
        note(f"bench: arm {ctx.arm} failed: {exc.message}")
        return _failed(ctx.arm, exc, exc.message)
    except Exception as exc:
        note(f"bench: arm {ctx.arm} failed: {type(exc).__name__}: {exc}")
        return _failed(ctx.arm, exc, f"{type(exc).__name__}: {exc}")
    finally:
        gc.collect()
    entry = {"arm": ctx.arm, "status": "ok", "reason": None, **_run_doc(run)}
    predicted = predicted_for_arm(ctx.arm, ctx.plan_of_arm, ctx.cpu_plan, ctx.spec, p)
    entry["predicted"] = predicted.to_dict() if predicted is not None else None
    done[key] = (index, entry)
    return entry


def _failed(arm: str, exc: BaseException, reason: str) -> dict:
    """A failed arm's entry: what went wrong, with the traceback's last lines."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    lines = "".join(tail).strip().splitlines()[-12:]
    return {
        "arm": arm,
        "status": "failed",
        "reason": reason[:500],
        "error": {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback_tail": lines},
    }


def _run_doc(run: ArmRun) -> dict:
    return {
        "samples": run.samples,
        "tokens": run.tokens,
        "tokens_stable": run.tokens_stable,
        "gpu_peak_memory_bytes": run.gpu_peak_memory_bytes,
        "host_peak_rss_bytes": run.host_peak_rss_bytes,
        "host_rss_before_bytes": run.host_rss_before_bytes,
        "host_peak_anon_bytes": run.host_peak_anon_bytes,
        "info": run.info,
        "engine_stats": run.engine_stats,
        "logits": run.logits,
    }
