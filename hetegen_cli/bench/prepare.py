"""Everything `hetegen bench` decides before loading a weight: options, the profile, the model
(a real one, or a synthetic checkpoint written once), the prompt, and one plan per GPU budget."""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.console import warn
from hetegen_cli.core.devices import cuda_available
from hetegen_cli.core.errors import InputError, PlanError, UsageError
from hetegen_cli.core.paths import probe
from hetegen_cli.measure.profile import load_or_measure
from hetegen_cli.models.formats.gguf_write import (
    GGUF_FORMATS,
    build_synthetic_gguf,
    gguf_preset_error,
    synthetic_gguf_path,
)
from hetegen_cli.models.formats.synthetic import build_synthetic_model
from hetegen_cli.models.loading.source import ModelRef, resolve_model
from hetegen_cli.models.shapes import presets
from hetegen_cli.plan.document import Plan
from hetegen_cli.plan.expert_use import load_expert_stats
from hetegen_cli.plan.request import PlanRequest, cpu_dtype_pair
from hetegen_cli.plan.solver import check_forced_formats, make_plan
from hetegen_cli.run.builders import all_cpu_formats_plan
from hetegen_cli.run.setup import ModelSetup

ARMS = (
    "hetegen",
    "offload",
    "accelerate",
    "layer-split",
    "experts-on-cpu",
    "cpu",
    "gpu",
    "reference",
    "llama.cpp",
)
RUN_ORDER = (
    "reference",
    "cpu",
    "hetegen",
    "experts-on-cpu",
    "llama.cpp",
    "offload",
    "accelerate",
    "layer-split",
    "gpu",
)
#: --synthetic-format values: random float weights, or a GGUF that llama.cpp reads too
SYNTHETIC_FORMATS = ("safetensors", *GGUF_FORMATS)


@dataclass(frozen=True)
class BenchOptions:
    """What to benchmark. Sizes in bytes; `gpu_budget_bytes` () = the profile's default budget."""

    setup: ModelSetup = field(default_factory=ModelSetup)  # what to load: model, quant, dtype, profile
    synthetic: str | None = None  # preset name: random weights of that shape
    synthetic_format: str | None = None  # SYNTHETIC_FORMATS; None: see synthetic_gguf_type
    cpu_dtype: str | None = None  # CPU share dtype(s): "D" or "P,D" (default: chosen per phase)
    prompt_len: int = 512
    max_new_tokens: int = 64
    repeat: int = 5
    warmup: int = 1
    arms: tuple[str, ...] | None = None  # None: every arm (reference only without CUDA)
    gpu_budget_bytes: tuple[int, ...] = ()
    seed: int = 0
    threads: int | None = None  # torch intra-op threads for every arm (default: plan's)
    expert_use_path: Path | None = None  # MoE models: counts that place the hetegen arm's experts
    command_line: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """InputError for anything wrong that needs no model or profile (checked once, here)."""
        threads = self.threads if self.threads is not None else 1
        for value, flag, high in (
            (self.repeat, "--repeat", 1000),
            (self.warmup, "--warmup", 100),
            (self.prompt_len, "--prompt-len", 2**24),
            (self.max_new_tokens, "--max-new-tokens", 2**24),
            (threads, "--threads", 4096),
            (self.seed, "--seed", 2**63),
        ):
            if value > high:
                raise UsageError(f"{flag} is {value}; it must be at most {high}", f"pass a smaller {flag}")
        for value, flag, low in (
            (self.repeat, "--repeat", 1),
            (self.warmup, "--warmup", 0),
            (self.prompt_len, "--prompt-len", 1),
            (self.max_new_tokens, "--max-new-tokens", 2),
            (threads, "--threads", 1),
        ):
            if value < low:
                raise UsageError(
                    f"{flag} is {value}; it must be at least {low}", f"pass {flag} {max(low, 1)} or more"
                )
        s = self.setup
        if s.device != "auto" or s.plan_path is not None or s.gpu_budget_bytes is not None:
            raise UsageError(
                "bench chooses each arm's device and plans every budget itself",
                "drop --device, --plan and --gpu-memory from the model setup; sweep with --gpu-memory A,B",
            )
        cpu_dtype_pair(self.cpu_dtype)
        if s.model and self.synthetic:
            raise UsageError(
                "--model and --synthetic are mutually exclusive",
                "pass one: a real model, or a preset to build with random weights",
            )
        if self.synthetic is not None and self.synthetic.lower() not in presets.PRESETS:
            raise UsageError(
                f"unknown preset {self.synthetic!r} for --synthetic",
                "known: " + ", ".join(presets.preset_names()),
            )
        if self.arms is not None:
            parse_arms(",".join(self.arms))
        self._check_synthetic_format()
        if any(b < 0 for b in self.gpu_budget_bytes):
            raise UsageError("--gpu-memory has a negative size", "give sizes of zero or more")
        if s.profile_path is not None and not stat.S_ISREG(
            (probe(Path(s.profile_path).expanduser(), "--profile") or os.stat_result((0,) * 10)).st_mode
        ):
            raise InputError(
                f"profile file {s.profile_path} does not exist",
                "create it with `hetegen profile --output PATH`, or drop --profile",
            )

    def _check_synthetic_format(self) -> None:
        fmt = self.synthetic_format
        if fmt is not None and fmt not in SYNTHETIC_FORMATS:
            raise UsageError(
                f"unknown --synthetic-format {fmt!r}", "use one of " + ", ".join(SYNTHETIC_FORMATS)
            )
        if fmt is not None and self.synthetic is None:
            raise UsageError(
                "--synthetic-format needs --synthetic", "name a preset with --synthetic, or drop the option"
            )
        if self.synthetic is None or self.synthetic_gguf_type() is None:
            return
        why = gguf_preset_error(self.synthetic.lower())
        if why and fmt is not None:
            raise UsageError(
                f"--synthetic-format {fmt}: {why}",
                "use a smollm2-* preset, or --synthetic-format safetensors",
            )
        if why:
            raise UsageError(
                f"the llama.cpp arm runs GGUF files, and {why}",
                "use a smollm2-* preset, or drop llama.cpp from --arms",
            )

    def synthetic_gguf_type(self) -> str | None:
        """The GGUF type of the linears when --synthetic is written as GGUF, else None: as
        --synthetic-format says; without it, when --arms names llama.cpp (Q8_0 for --quant
        int8, Q4_0 otherwise)."""
        if self.synthetic is None:
            return None
        if self.synthetic_format is not None:
            return GGUF_FORMATS.get(self.synthetic_format)
        if self.arms is not None and "llama.cpp" in self.arms:
            return "Q8_0" if self.setup.quant == "int8" else "Q4_0"
        return None

    @property
    def weights_dtype(self) -> str | None:
        """The weights dtype of every arm; None: the checkpoint's (--dtype auto)."""
        return None if self.setup.dtype == "auto" else self.setup.dtype

    @property
    def model_arg(self) -> str:
        """The model as the user named it (--model, else --synthetic; "" for the default)."""
        return self.setup.model or self.synthetic or ""


@dataclass
class BudgetCase:
    """One GPU budget: as requested (None = the profile's default) and as planned."""

    requested_gpu_budget_bytes: int | None
    gpu_budget_bytes: int | None
    plan: Plan | None
    plan_error: str | None
    #: a mixture-of-experts model's `experts-on-cpu` plan for this budget: every routed expert
    #: on the CPU, the rest placed by the planner (llama.cpp's --cpu-moe); None for dense models
    moe_plan: Plan | None = None
    moe_plan_error: str | None = None


@dataclass
class Prepared:
    options: BenchOptions
    ref: ModelRef
    model_doc: dict
    profile: dict
    profile_identity: dict
    prompt_ids: list[int]
    cases: list[BudgetCase]
    arms: list[str]
    has_cuda: bool
    cpu_plan: Plan | None = None  # all-CPU plan of the `cpu` arm (its formats per phase)
    cpu_ref: ModelRef | None = None  # the model in the `cpu` arm's run dtype
    gguf: Path | None = None  # the GGUF file the model came from (the llama.cpp arm runs it)
    cpu_plan_error: str | None = None


def parse_arms(text: str | None) -> tuple[str, ...] | None:
    """'hetegen,cpu' -> ('hetegen', 'cpu'); InputError names unknown arms."""
    if text is None:
        return None
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise UsageError(
            f"unknown arm {bad[0]!r} in --arms" if bad else "--arms is empty",
            "choose from " + ", ".join(ARMS) + " (comma separated)",
        )
    return tuple(dict.fromkeys(names))


def default_arms(has_cuda: bool, moe: bool = False) -> list[str]:
    """Every arm, but `reference` only without CUDA and `experts-on-cpu` only for a
    mixture-of-experts model."""
    return [a for a in ARMS if (a != "reference" or not has_cuda) and (a != "experts-on-cpu" or moe)]


def resolve_bench_model(o: BenchOptions, progress: Any = None) -> tuple[ModelRef, dict]:
    """(ModelRef with local weights, model section of the document)."""
    qtype = o.synthetic_gguf_type()
    if o.synthetic and qtype:
        preset = o.synthetic.lower()
        gguf = build_synthetic_gguf(preset, qtype, _synthetic_root(), seed=o.seed, progress=progress)
        ref = resolve_model(str(gguf), need_weights=True, dtype=o.weights_dtype, quant=o.setup.quant)
        source = {
            "kind": "synthetic",
            "preset": preset,
            "seed": o.seed,
            "format": f"gguf-{qtype.lower()}",
            "gguf": str(gguf),
        }
    elif o.synthetic:
        preset = o.synthetic.lower()
        dtype = o.weights_dtype or presets.preset_config(preset).get("torch_dtype", "float16")
        folder = build_synthetic_model(preset, dtype, _synthetic_root(), seed=o.seed, progress=progress)
        ref = resolve_model(str(folder), need_weights=True, dtype=dtype, quant=o.setup.quant)
        source = {"kind": "synthetic", "preset": preset, "seed": o.seed, "format": "safetensors"}
    else:
        s = o.setup
        ref = resolve_model(
            s.model,
            need_weights=True,
            dtype=o.weights_dtype,
            quant=s.quant,
            allow_float_copy=s.allow_float_copy,
        )
        source = {"kind": ref.kind}
    s = ref.spec
    return ref, {
        "arg": o.setup.model or "",
        "name": ref.name,
        "path": str(ref.path) if ref.path else None,
        **source,
        "architecture": s.architecture,
        "dtype": s.dtype,
        "num_layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "parameters": s.parameter_count,
        "weight_bytes": s.total_weight_bytes,
        "config_hash": s.config_hash,
    }


def _synthetic_root() -> Path:
    return paths.models_dir() / "synthetic"


def source_gguf(o: BenchOptions) -> Path | None:
    """The GGUF file behind the model: a .gguf --model, the default model's, or the
    synthetic GGUF of --synthetic (once written); else None."""
    if o.synthetic:
        qtype = o.synthetic_gguf_type()
        return synthetic_gguf_path(o.synthetic.lower(), qtype, o.seed, _synthetic_root()) if qtype else None
    model = o.setup.model
    if model is None or model.lower() == presets.DEFAULT_MODEL:
        from hetegen_cli.models.formats.gguf import default_gguf_path

        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def prompt_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """A fixed random prompt: `length` ids in [min(10, V-1), V), from `seed`."""
    rng = random.Random(seed)
    low = min(10, vocab_size - 1)
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def make_cases(ref: ModelRef, o: BenchOptions, profile: dict, identity: dict) -> list[BudgetCase]:
    """One plan per budget (a PlanError becomes the case's plan_error, not a failure)."""
    cases, stats = [], None
    if o.expert_use_path is not None:
        stats, use_warnings = load_expert_stats(o.expert_use_path, ref.spec)
        for message in use_warnings:
            warn(message)
    for requested in o.gpu_budget_bytes or (None,):
        req = PlanRequest(
            prompt_len=o.prompt_len,
            max_new_tokens=o.max_new_tokens,
            gpu_budget_bytes=requested,
            cpu_dtype=o.cpu_dtype,
            model_arg=o.model_arg,
            expert_use=stats,
        )
        plan, error = _plan_or_error(ref, o, profile, identity, req)
        budget = requested if requested is not None or plan is None else plan.budget.gpu_budget_bytes
        case = BudgetCase(requested, budget, plan, error)
        if ref.spec.experts:
            moe = replace(req, cpu_moe=True, expert_split=False)  # llama.cpp's --cpu-moe
            case.moe_plan, case.moe_plan_error = _plan_or_error(ref, o, profile, identity, moe)
        cases.append(case)
    return cases


def _plan_or_error(
    ref: ModelRef, o: BenchOptions, profile: dict, identity: dict, req: PlanRequest
) -> tuple[Plan | None, str | None]:
    """(plan, None), or (None, the planner's message): a refused budget is not a failure."""
    try:
        return _with_threads(make_plan(ref.spec, profile, req, profile_identity=identity), o.threads), None
    except PlanError as exc:
        return None, exc.message


def _with_threads(plan: Plan, threads: int | None) -> Plan:
    """`plan` with --threads as its CPU thread count (and a note), when given."""
    if threads is None or threads == plan.runtime.cpu_threads:
        return plan
    return replace(
        plan,
        runtime=replace(plan.runtime, cpu_threads=threads),
        notes=(
            *plan.notes,
            f"--threads {threads}: the CPU share runs on {threads} threads; the predictions "
            f"assume the profile's {plan.runtime.cpu_threads}",
        ),
    )


def make_cpu_case(
    ref: ModelRef, o: BenchOptions, profile: dict, identity: dict
) -> tuple[Plan | None, ModelRef | None, str | None]:
    """(all-CPU plan, the model in its run dtype, error) of the `cpu` arm
    (run.builders.all_cpu_formats_plan: the profile's CPU formats per phase)."""
    req = PlanRequest(
        prompt_len=o.prompt_len, max_new_tokens=o.max_new_tokens, cpu_dtype=o.cpu_dtype, model_arg=o.model_arg
    )
    try:
        plan, cpu_ref = all_cpu_formats_plan(ref, profile, identity, req)
    except PlanError as exc:
        return None, None, exc.message
    return _with_threads(plan, o.threads), cpu_ref, None


def prepare(o: BenchOptions, progress: Any = None) -> Prepared:
    """Load the profile, resolve the model and plan every budget (no weights read;
    --synthetic writes its random checkpoint once)."""
    has_cuda = cuda_available()
    profile, identity = load_or_measure(o.setup.profile_path, progress)
    check_forced_formats(profile, cpu_dtype_pair(o.cpu_dtype))
    ref, model_doc = resolve_bench_model(o, progress)
    for message in ref.warnings:
        warn(message)
    ref.spec.check_context(o.prompt_len, o.max_new_tokens, "--prompt-len")
    cases = make_cases(ref, o, profile, identity)
    arms = [a for a in RUN_ORDER if a in (o.arms or default_arms(has_cuda, bool(ref.spec.experts)))]
    ids = prompt_ids(ref.spec.vocab_size, o.prompt_len, o.seed)
    cpu_plan = cpu_ref = cpu_error = None
    if "cpu" in arms and ref.spec.quant is None:  # the planner takes float weights only
        cpu_plan, cpu_ref, cpu_error = make_cpu_case(ref, o, profile, identity)
    return Prepared(
        o,
        ref,
        model_doc,
        profile,
        identity,
        ids,
        cases,
        arms,
        has_cuda,
        cpu_plan=cpu_plan,
        cpu_ref=cpu_ref,
        cpu_plan_error=cpu_error,
        gguf=source_gguf(o),
    )
