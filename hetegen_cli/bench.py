"""`hetegen bench`: the same model, prompt and GPU budget through several strategies ("arms").

Library entry point: `run_bench(BenchOptions(...)) -> dict` (the "hetegen.bench" document).

Method (peers.md section 4): every arm gets the same seeded random prompt ids of `prompt_len`
tokens and decodes `max_new_tokens` greedily with EOS ignored, through one generation loop
(generate.generate, synchronising clock). `warmup` discarded runs, then `repeat` timed runs;
raw samples are kept. Host peak memory: process RSS sampled every 10 ms by a background thread
from before the arm loads until it is closed. GPU peak: torch's peak allocated bytes.
Arms are run by an injectable table (`runners`), so the report logic is testable with fakes.
"""

from __future__ import annotations

import gc
import platform
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from hetegen_cli import __version__, bench_arms
from hetegen_cli.bench_arms import ArmContext
from hetegen_cli.bench_measure import RSS_INTERVAL_S, RssSampler, timed_runs
from hetegen_cli.errors import HetegenError, InputError

BENCH_KIND = "hetegen.bench"
BENCH_SCHEMA_VERSION = 1
ARMS = ("hetegen", "offload", "accelerate", "layer-split", "cpu", "gpu", "reference")
RUN_ORDER = ("reference", "cpu", "hetegen", "offload", "accelerate", "layer-split", "gpu")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class BenchOptions:
    """What to benchmark. Sizes are text (`"6GiB"`) as typed; () = the profile's default budget."""

    model: str | None = None
    synthetic: str | None = None        # preset name: random weights of that shape
    dtype: str | None = None            # weights dtype (default: the model's)
    cpu_dtype: str | None = None        # CPU share dtype (default: the profile's fastest)
    profile: str | Path | None = None   # default: the saved profile, measured quick if missing
    prompt_len: int = 512
    max_new_tokens: int = 64
    repeat: int = 5
    warmup: int = 1
    arms: tuple[str, ...] | None = None  # None: every arm (reference only without CUDA)
    gpu_memory: tuple[str, ...] = ()
    seed: int = 0
    threads: int | None = None          # torch intra-op threads for every arm (default: plan's)
    command_line: tuple[str, ...] = ()


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
    logits: dict | None = None   # top2_ids, margins, top1_logits per generated token (check run)


Runner = Callable[[ArmContext, "Prepared"], ArmRun]


@dataclass
class BudgetCase:
    requested_bytes: int | None
    budget_bytes: int | None
    plan: Any
    plan_error: str | None


@dataclass
class Prepared:
    options: BenchOptions
    ref: Any
    model_doc: dict
    profile: dict
    profile_identity: dict
    prompt_ids: list[int]
    cases: list[BudgetCase]
    arms: list[str]
    has_cuda: bool


def cuda_available() -> bool:
    from hetegen_cli.devices import cuda_available as available

    return available()


# --- validation --------------------------------------------------------------------------

def parse_arms(text: str | None) -> tuple[str, ...] | None:
    """'hetegen,cpu' -> ('hetegen', 'cpu'); InputError names unknown arms."""
    if text is None:
        return None
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise InputError(f"unknown arm {bad[0]!r} in --arms" if bad else "--arms is empty",
                         "choose from " + ", ".join(ARMS) + " (comma separated)")
    return tuple(dict.fromkeys(names))


def parse_budgets(text: str | None) -> tuple[str, ...]:
    """'4GiB,8GiB' -> ('4GiB', '8GiB') after checking every entry parses."""
    from hetegen_cli.units import parse_size

    if text is None:
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise InputError(f"--gpu-memory {text!r} has an empty entry",
                         "give sizes separated by commas, e.g. 4GiB,8GiB")
    for p in parts:
        parse_size(p, "--gpu-memory")
    return tuple(parts)


def validate_options(o: BenchOptions) -> None:
    """InputError for anything wrong that needs no model or profile."""
    from hetegen_cli.units import parse_size

    for value, flag, low in ((o.repeat, "--repeat", 1), (o.warmup, "--warmup", 0),
                             (o.prompt_len, "--prompt-len", 1), (o.max_new_tokens, "--max-new-tokens", 2),
                             (o.threads if o.threads is not None else 1, "--threads", 1)):
        if value < low:
            raise InputError(f"{flag} is {value}; it must be at least {low}", f"pass {flag} {max(low, 1)} or more")
    for value, flag in ((o.dtype, "--dtype"), (o.cpu_dtype, "--cpu-dtype")):
        if value is not None and value not in DTYPES:
            raise InputError(f"unknown {flag} {value!r}", "use one of " + ", ".join(DTYPES))
    if o.model and o.synthetic:
        raise InputError("--model and --synthetic are mutually exclusive",
                         "pass one: a real model, or a preset to build with random weights")
    if o.synthetic is not None:
        from hetegen_cli import presets

        if o.synthetic.lower() not in presets.PRESETS:
            raise InputError(f"unknown preset {o.synthetic!r} for --synthetic",
                             "known: " + ", ".join(presets.preset_names()))
    if o.arms is not None:
        parse_arms(",".join(o.arms))
    for text in o.gpu_memory:
        parse_size(text, "--gpu-memory")
    if o.profile is not None and not Path(o.profile).expanduser().is_file():
        raise InputError(f"profile file {o.profile} does not exist",
                         "create it with `hetegen profile --output PATH`, or drop --profile")


def default_arms(has_cuda: bool) -> list[str]:
    return [a for a in ARMS if a != "reference" or not has_cuda]


# --- preparation (no weights loaded) ------------------------------------------------------

def load_profile(path: str | Path | None, progress: Any = None) -> tuple[dict, dict]:
    """(profile document, identity); measures and saves a quick profile when none is saved."""
    from hetegen_cli.profile_doc import load_or_measure_profile

    return load_or_measure_profile(path, progress)


def resolve_bench_model(o: BenchOptions, progress: Any = None) -> tuple[Any, dict]:
    """(ModelRef with local weights, model section of the document)."""
    from hetegen_cli import paths, presets
    from hetegen_cli.model_source import resolve_model

    if o.synthetic:
        from hetegen_cli.synthetic import build_synthetic_model

        preset = o.synthetic.lower()
        dtype = o.dtype or presets.preset_config(preset).get("torch_dtype", "float16")
        folder = build_synthetic_model(preset, dtype, paths.models_dir() / "synthetic",
                                       seed=o.seed, progress=progress)
        ref = resolve_model(str(folder), need_weights=True, dtype=dtype)
        source = {"kind": "synthetic", "preset": preset, "seed": o.seed}
    else:
        ref = resolve_model(o.model, need_weights=True, dtype=o.dtype)
        source = {"kind": ref.kind}
    s = ref.spec
    return ref, {"arg": o.model or "", "name": ref.name, "path": str(ref.path) if ref.path else None,
                 **source, "architecture": s.architecture, "dtype": s.dtype,
                 "num_layers": s.num_layers, "hidden_size": s.hidden_size,
                 "parameters": s.parameter_count, "weight_bytes": s.total_weight_bytes,
                 "config_hash": s.config_hash}


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """A fixed random prompt: `length` ids in [min(10, V-1), V), from `seed`."""
    rng = random.Random(seed)
    low = min(10, vocab_size - 1)
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def make_cases(ref: Any, o: BenchOptions, profile: dict, identity: dict) -> list[BudgetCase]:
    """One plan per budget (a PlanError becomes the case's plan_error, not a failure)."""
    from hetegen_cli import planner
    from hetegen_cli.errors import PlanError
    from hetegen_cli.units import parse_size

    cases = []
    for text in o.gpu_memory or (None,):
        requested = parse_size(text, "--gpu-memory") if text is not None else None
        req = planner.PlanRequest(prompt_len=o.prompt_len, max_new_tokens=o.max_new_tokens,
                                  gpu_budget_bytes=requested, cpu_dtype=o.cpu_dtype,
                                  model_arg=o.model or o.synthetic or "")
        try:
            plan = planner.make_plan(ref.spec, profile, req, profile_identity=identity)
            if o.threads is not None and o.threads != plan.runtime.cpu_threads:
                plan = replace(plan, runtime=replace(plan.runtime, cpu_threads=o.threads),
                               notes=plan.notes + (f"--threads {o.threads}: the CPU share runs "
                                                   f"on {o.threads} threads; the predictions "
                                                   f"assume the profile's {plan.runtime.cpu_threads}",))
            budget = requested if requested is not None else plan.budget.get("gpu_budget_bytes")
            cases.append(BudgetCase(requested, budget, plan, None))
        except PlanError as exc:
            cases.append(BudgetCase(requested, requested, None, exc.message))
    return cases


def prepare(o: BenchOptions, progress: Any = None) -> Prepared:
    """Validate, load the profile, resolve the model and plan every budget (no weights read;
    --synthetic writes its random checkpoint once)."""
    from hetegen_cli import planner, profile_doc

    validate_options(o)
    has_cuda = cuda_available()
    profile, identity = load_profile(o.profile, progress)
    if o.cpu_dtype and not profile_doc.gemv_entries(profile, o.cpu_dtype):
        from hetegen_cli.errors import ProfileError

        measured = sorted({m["dtype"] for m in profile["cpu"]["gemv"]})
        raise ProfileError(f"the profile has no CPU GEMV measurements for {o.cpu_dtype}",
                           f"pass --cpu-dtype {' or '.join(measured)}, or re-run `hetegen profile`")
    ref, model_doc = resolve_bench_model(o, progress)
    planner.validate_request(ref.spec, planner.PlanRequest(
        prompt_len=o.prompt_len, max_new_tokens=o.max_new_tokens, cpu_dtype=o.cpu_dtype))
    cases = make_cases(ref, o, profile, identity)
    arms = [a for a in RUN_ORDER if a in (o.arms or default_arms(has_cuda))]
    ids = prompt_ids(ref.spec.vocab_size, o.prompt_len, o.seed)
    return Prepared(o, ref, model_doc, profile, identity, ids, cases, arms, has_cuda)


# --- measurement -------------------------------------------------------------------------

def run_arm(ctx: ArmContext, prepared: Prepared, on_run: Callable[[], None] | None = None) -> ArmRun:
    """The default runner: build the arm, time it, close it; peaks measured around it all."""
    from hetegen_cli.devices import get_backend, out_of_memory_as_error

    backend = get_backend("cuda") if prepared.has_cuda else None
    o = prepared.options
    gc.collect()
    if backend:
        backend.reset_peak_memory()
    with RssSampler() as rss:
        with out_of_memory_as_error(f"loading the {ctx.arm} arm"):
            built = bench_arms.BUILDERS[ctx.arm](ctx)
        load_peak = backend.peak_memory_bytes() if backend else None
        if backend:
            backend.reset_peak_memory()  # from here: the running peak (weights + KV + work)
        try:
            samples, tokens, check = timed_runs(built, prepared.prompt_ids, o.max_new_tokens,
                                                o.warmup, o.repeat, on_run)
            stats = built.stats() if built.stats else None
        finally:
            built.close()
            del built.model
    gc.collect()
    return ArmRun(samples, check["tokens"], all(t == check["tokens"] for t in tokens),
                  backend.peak_memory_bytes() if backend else None, rss.peak, rss.before,
                  {**built.info, "gpu_load_peak_memory_bytes": load_peak}, stats, check)


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


def run_bench(options: BenchOptions, runners: dict[str, Runner] | None = None,
              progress: Any = None, prepared: Prepared | None = None) -> dict:
    """Run every requested arm at every budget; return the "hetegen.bench" document.

    `runners` maps arm name -> runner(ctx, prepared) -> ArmRun (default: run_arm) so tests can
    inject fake measurements. Failures inside one arm (out of memory, load errors) mark that
    arm "failed" with the message and the benchmark goes on.
    """
    from hetegen_cli import bench_report

    p = prepared or prepare(options, progress)
    o, runners = p.options, runners or {}
    task = progress.add_task("bench", total=len(p.cases) * len(p.arms) * (o.warmup + o.repeat)) \
        if progress else None
    done: dict[str, tuple[int, dict]] = {}
    budgets = []
    for index, case in enumerate(p.cases):
        entries = []
        threads = case.plan.runtime.cpu_threads if case.plan else \
            (o.threads or int(p.profile["cpu"]["threads"]))
        for arm in p.arms:
            ctx = ArmContext(arm, p.ref, case.plan, case.plan_error, case.budget_bytes,
                             p.has_cuda, threads,
                             {"prompt_len": o.prompt_len, "max_new_tokens": o.max_new_tokens})
            entries.append(_one_arm(ctx, p, runners, done, index, progress, task))
        budgets.append(bench_report.budget_section(case, entries, p.ref.spec))
    doc = {
        "schema_version": BENCH_SCHEMA_VERSION, "kind": BENCH_KIND,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command_line": list(o.command_line or sys.argv),
        "model": p.model_doc,
        "workload": {"prompt_len": o.prompt_len, "max_new_tokens": o.max_new_tokens,
                     "batch_size": 1, "decoding": "greedy, EOS ignored", "prompt_seed": o.seed,
                     "prompt_token_ids": p.prompt_ids},
        "method": {"warmup_runs": o.warmup, "repeat": o.repeat,
                   "timer": "time.perf_counter after device synchronisation (generate.generate)",
                   "host_memory": f"process RSS sampled every {RSS_INTERVAL_S * 1e3:.0f} ms by a "
                                  "background thread from before loading the arm until it is closed",
                   "gpu_memory": "torch peak allocated bytes while generating (reset after "
                                 "loading; the loading peak is info.gpu_load_peak_memory_bytes; "
                                 "CUDA context excluded)",
                   "sd": "sample standard deviation (n-1)"},
        "provenance": {"profile": p.profile_identity, "has_cuda": p.has_cuda,
                       "cpu_model": (p.profile.get("host") or {}).get("cpu_model"),
                       "profile_threads": p.profile["cpu"]["threads"], "versions": versions(),
                       "platform": platform.platform()},
        "arms_requested": list(p.arms),
        "budgets": budgets,
    }
    return bench_report.finish(doc)


def _one_arm(ctx: ArmContext, p: Prepared, runners: dict, done: dict, index: int,
             progress: Any, task: Any) -> dict:
    from hetegen_cli.output import note

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
        run = runner(ctx, p)
    except HetegenError as exc:
        note(f"bench: arm {ctx.arm} failed: {exc.message}")
        return {"arm": ctx.arm, "status": "failed", "reason": exc.message}
    entry = {"arm": ctx.arm, "status": "ok", "reason": None, **_run_doc(run)}
    done[key] = (index, entry)
    return entry


def _run_doc(run: ArmRun) -> dict:
    return {"samples": run.samples, "tokens": run.tokens, "tokens_stable": run.tokens_stable,
            "gpu_peak_memory_bytes": run.gpu_peak_memory_bytes,
            "host_peak_rss_bytes": run.host_peak_rss_bytes,
            "host_rss_before_bytes": run.host_rss_before_bytes,
            "info": run.info, "engine_stats": run.engine_stats, "logits": run.logits}
