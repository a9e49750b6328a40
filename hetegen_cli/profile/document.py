"""The hardware profile document: schema, build, validate, load, save (pure, no torch).

`hetegen profile` writes it; `plan` reads it. Every timing is a stats dict (core.stats:
mean, sd, median, min, max, n, samples) in seconds per call; rates derive from the mean.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, model_validator

from hetegen_cli import __version__
from hetegen_cli.core.errors import ProfileError
from hetegen_cli.core.jsonio import read_document, write_document
from hetegen_cli.core.validation import Count, Flag, Index, NonNegative, Positive, Schema, Text, check

PROFILE_KIND = "hetegen.profile"
PROFILE_SCHEMA_VERSION = 2  # 2: the engine's fixed costs (`engine`)
SUPPORTED_PROFILE_VERSIONS = (1, 2)  # 1 loads without `engine`; plan says so in a note
PRODUCED_BY = "hetegen profile"
GPU_SKIPPED_NOTE = "no CUDA GPU: GPU measurements skipped"

#: CPU flags that matter to matrix kernels (names as in /proc/cpuinfo).
CPU_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "avx_vnni",
    "neon",
    "asimd",
)


def rate(amount: float, seconds: dict[str, Any]) -> float:
    """amount / mean seconds (bytes/s, params/s, FLOP/s); 0 if the mean is not positive."""
    mean = float(seconds["mean"])
    return amount / mean if mean > 0 else 0.0


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_profile(
    host: dict,
    cpu: dict,
    gpu: dict | None,
    gpu_note: str | None,
    quick: bool,
    created_utc: str | None = None,
    engine: dict | None = None,
) -> dict[str, Any]:
    """The profile document, leading with schema_version and kind. `engine`: the engine's
    fixed costs (measure.engine_costs), or None when they were not measured."""
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "kind": PROFILE_KIND,
        "hetegen_version": __version__,
        "created_utc": created_utc or utc_now(),
        "quick": bool(quick),
        "host": host,
        "cpu": cpu,
        "gpu": gpu,
        "gpu_note": gpu_note,
        "engine": engine,
    }


# --- schema (docs/validation.md) ------------------------------------------------------------

WeightDtype = Literal["float32", "bfloat16", "float16"]
Threads = Annotated[StrictInt, Field(ge=1, le=65536)]
Dim = Annotated[StrictInt, Field(ge=1, le=2**31)]


class Seconds(Schema):
    """Seconds per call: strictly positive and finite, so every rate derived from it is too."""

    mean: Positive
    sd: NonNegative
    samples: Annotated[list[Positive], Field(min_length=1)]


class Bandwidth(Schema):
    mean: Positive
    sd: NonNegative


class Host(Schema):
    cpu_model: Text
    physical_cores: Threads
    logical_cores: Threads
    ram_total_bytes: Count
    ram_available_bytes: Index
    features: dict[str, Flag]
    os: Text
    python: Text
    torch: Text


class CpuGemv(Schema):
    dtype: WeightDtype
    out_features: Dim
    in_features: Dim
    weight_bytes: Count
    threads: Threads
    seconds: Seconds
    weight_bytes_per_s: Positive
    params_per_s: Positive


class CpuGemm(Schema):
    dtype: WeightDtype
    tokens: Dim
    out_features: Dim
    in_features: Dim
    threads: Threads
    seconds: Seconds
    flops_per_s: Positive


class ThreadPoint(Schema):
    threads: Threads
    dtype: WeightDtype
    out_features: Dim
    in_features: Dim
    weight_bytes_per_s: Positive


class QuantGemv(Schema):
    format: Literal["int8", "int4"]
    group_size: Dim | None = None
    kernel: Literal["hetegen-avx2", "torch"] | None = None  # models.formats.cpu_kernels; older: torch
    out_features: Dim
    in_features: Dim
    weight_bytes: Dim
    threads: Threads
    seconds: Seconds
    weight_bytes_per_s: Positive
    params_per_s: Positive


class Cpu(Schema):
    threads: Threads
    memory_read_bytes_per_s: Bandwidth
    gemv: Annotated[list[CpuGemv], Field(min_length=1)]
    gemm: Annotated[list[CpuGemm], Field(min_length=1)]
    thread_sweep: list[ThreadPoint]
    best_gemv_dtype: WeightDtype
    quant_gemv: list[QuantGemv] = Field(default_factory=list)  # profiles before issue 11 lack it
    #: class of prompt product -> the float32 GEMM it uses (models.formats.cpu_gemm.CLASSES);
    #: older profiles lack it
    prompt_gemm: dict[Text, Literal["torch", "onednn"]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _best_is_measured(self) -> Cpu:
        if self.best_gemv_dtype not in {g.dtype for g in self.gemv}:
            raise ValueError(f"best_gemv_dtype {self.best_gemv_dtype!r} has no GEMV measurements")
        return self


class GpuGemm(Schema):
    dtype: WeightDtype
    tokens: Dim
    out_features: Dim
    in_features: Dim
    seconds: Seconds
    flops_per_s: Positive


class GpuGemv(Schema):
    dtype: WeightDtype
    out_features: Dim
    in_features: Dim
    weight_bytes: Count
    seconds: Seconds
    weight_bytes_per_s: Positive


class Transfer(Schema):
    direction: Literal["h2d", "d2h"]
    memory: Literal["pinned", "pageable"]
    size_bytes: Count
    seconds: Seconds
    bytes_per_s: Positive


class Concurrent(Schema):
    dtype: WeightDtype
    size_bytes: Count
    h2d_alone_bytes_per_s: Positive
    h2d_bytes_per_s: Positive
    cpu_gemv_alone_weight_bytes_per_s: Positive
    cpu_gemv_weight_bytes_per_s: Positive


class CopyEngineProbe(Schema):
    """A small H2D copy alone and while a big one runs on another stream (measure.gpu)."""

    small_copy_alone_s: NonNegative
    small_copy_during_big_s: NonNegative
    big_copy_s: NonNegative
    h2d_copy_engines: Literal[1, 2] | None  # None: the probe could not tell (no overlap)


class Gpu(Schema):
    name: Text
    total_memory_bytes: Count
    free_memory_bytes: Index
    compute_capability: Text
    gemm: Annotated[list[GpuGemm], Field(min_length=1)]
    gemv: Annotated[list[GpuGemv], Field(min_length=1)]
    transfers: list[Transfer]
    concurrent: Concurrent
    copy_engine_probe: CopyEngineProbe | None = None  # profiles before issue 18 lack it

    @model_validator(mode="after")
    def _has_pinned_h2d(self) -> Gpu:
        if not any(t.direction == "h2d" and t.memory == "pinned" for t in self.transfers):
            raise ValueError("transfers hold no pinned host-to-GPU copy")
        if self.free_memory_bytes > self.total_memory_bytes:
            raise ValueError("free_memory_bytes exceeds total_memory_bytes")
        return self


class PrefillPoint(Schema):
    tokens: Dim
    layer_s: NonNegative  # non-linear seconds per decoder layer
    token_s: NonNegative  # seconds per step outside the layers and linears


class DecodePoint(Schema):
    context: Dim
    layer_s: NonNegative
    token_s: NonNegative


class EngineEntry(Schema):
    """Fixed costs measured on one device, activation dtype, architecture family and weights:
    "float" (the stock model; every point less its linears called alone) or "int4" (the
    quantized model as `run` loads it; its decode points keep the tiny model's linears,
    measure.engine_costs says why)."""

    device: Literal["cpu", "cuda"]
    backend: Text
    dtype: WeightDtype
    architecture: Literal["llama", "opt", "moe"]  # moe: a quantized Qwen3-MoE (int4 only)
    weights: Literal["float", "int4"] = "float"
    threads: Threads
    sample_s_per_vocab: NonNegative
    prefill: Annotated[list[PrefillPoint], Field(min_length=1)]
    decode: Annotated[list[DecodePoint], Field(min_length=1)]
    #: mode (inline, split, stream) -> phase -> seconds the engine adds per linear
    linear_s: dict[Literal["inline", "split", "stream"], dict[Literal["prefill", "decode"], NonNegative]] = (
        Field(default_factory=dict)
    )


class EngineModel(Schema):
    hidden_size: Dim
    num_heads: Dim
    head_dim: Dim
    kv_width: Dim
    vocab_size: Dim


class EngineCosts(Schema):
    """The engine's fixed costs (measure.engine_costs measures them; plan.costmodel.fixed fits them)."""

    version: Literal[1]
    model: EngineModel
    entries: Annotated[list[EngineEntry], Field(min_length=1)]


class EngineError(Schema):
    """Why the engine's fixed costs are missing: the measurement failed (`hetegen profile`
    keeps the rest of the profile)."""

    type: Text
    message: Text
    traceback: list[Text]  # the last lines


class Busy(Schema):
    busy: Flag
    reasons: list[Text]
    load_average_1m: NonNegative | None = None  # when measuring started
    cpu_pressure_some_avg10: NonNegative | None = None  # /proc/pressure/cpu, %, when it started
    gemv_median_relative_sd: NonNegative | None = None  # sd / mean of the CPU GEMV repeats


class Profile(Schema):
    schema_version: StrictInt
    kind: Literal["hetegen.profile"]
    hetegen_version: Text
    created_utc: Text
    quick: Flag
    host: Host
    cpu: Cpu
    gpu: Gpu | None
    gpu_note: Text | None
    engine: EngineCosts | None = None  # schema 2; version 1 profiles have none
    engine_error: EngineError | None = None  # set when measuring `engine` failed
    busy: Busy | None = None  # profiles before it lack it


#: the signs of a busy machine (measure.profile records them; docs/profile.md)
BUSY_LOAD_PER_CORE = 0.75  # 1-minute load average per logical core when measuring starts
BUSY_PRESSURE_PCT = 25.0  # % of the last 10 s some runnable task waited for a CPU
BUSY_RELATIVE_SD = 0.15  # median sd / mean of the CPU GEMV repeats


def assess_busy(
    load_average: float | None, pressure: float | None, relative_sd: float | None, logical_cores: int
) -> dict[str, Any]:
    """The profile's `busy` section from what measure saw: busy when any sign passes its
    threshold, with a reason for each."""
    reasons = []
    if load_average is not None and load_average >= BUSY_LOAD_PER_CORE * logical_cores:
        reasons.append(f"load average {load_average:.1f} on {logical_cores} cores when it started")
    if pressure is not None and pressure >= BUSY_PRESSURE_PCT:
        reasons.append(f"CPU pressure {pressure:.0f}% (tasks waiting for a core) when it started")
    if relative_sd is not None and relative_sd >= BUSY_RELATIVE_SD:
        reasons.append(f"CPU GEMV repeats spread {relative_sd:.0%} (median sd / mean)")
    return {
        "busy": bool(reasons),
        "reasons": reasons,
        "load_average_1m": load_average,
        "cpu_pressure_some_avg10": pressure,
        "gemv_median_relative_sd": relative_sd,
    }


def busy_warning(profile: dict[str, Any] | Profile, path: str | Path | None = None) -> str | None:
    """The warning for a profile measured on a busy machine, or None."""
    busy = profile_sections(profile).busy
    if busy is None or not busy.busy:
        return None
    where = f" {path}" if path is not None else ""
    return (
        f"the profile{where} was measured while the machine was busy ({'; '.join(busy.reasons)}): "
        f"its rates, and the plans and predictions made from them, may be off; re-run `{PRODUCED_BY}` "
        "on an idle machine"
    )


def validate_profile(doc: dict[str, Any], source: str = "profile") -> dict[str, Any]:
    """Check every field the planner and the reports read (types, ranges, finite positive
    measurements); raise ProfileError naming the first bad field. Returns `doc` unchanged."""
    check(
        Profile,
        doc,
        source=f"{source} is not a valid hardware profile",
        error=ProfileError,
        hint=f"re-run `{PRODUCED_BY}`",
    )
    return doc


def profile_sections(doc: dict[str, Any] | Profile, source: str = "profile") -> Profile:
    """The typed sections of a profile document, validated as validate_profile does (a Profile
    is returned as it is). Readers use these; the document stays a dict on disk."""
    if isinstance(doc, Profile):
        return doc
    return check(
        Profile,
        doc,
        source=f"{source} is not a valid hardware profile",
        error=ProfileError,
        hint=f"re-run `{PRODUCED_BY}`",
    )


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read and validate a saved profile; ProfileError (hint: re-run) on any problem."""
    doc = read_document(path, PROFILE_KIND, SUPPORTED_PROFILE_VERSIONS, ProfileError, PRODUCED_BY)
    return validate_profile(doc, str(path))


def save_profile(doc: dict[str, Any], path: str | Path) -> Path:
    """Validate, then write atomically (no half-written file on failure)."""
    validate_profile(doc)
    return write_document(path, doc)


# --- helpers for readers (the planner, bench) --------------------------------------------


def identity(profile: dict | Profile, path: str | Path | None) -> dict:
    """Who made a plan's numbers: the plan's `profile` section (path, date, machine, sha256
    of the file's bytes when `path` is given)."""
    sha = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest() if path else None
    p = profile_sections(profile)
    return {
        "path": str(path) if path else None,
        "created_utc": p.created_utc,
        "cpu_model": p.host.cpu_model,
        "gpu_name": p.gpu.name if p.gpu else None,
        "quick": p.quick,
        "sha256": sha,
    }


def available_ram(profile: dict | Profile) -> int | None:
    """Host RAM available when the profile was taken, in bytes."""
    return profile_sections(profile).host.ram_available_bytes or None


def gpu_memory(profile: dict | Profile) -> tuple[int | None, int | None]:
    """(free, total) GPU memory in bytes when the profile was taken; (None, None) without a GPU."""
    gpu = profile_sections(profile).gpu
    if gpu is None:
        return None, None
    return gpu.free_memory_bytes, gpu.total_memory_bytes
