"""The plan: per-linear placement decisions that `plan` writes and `run`/`bench` execute.

Pure Python (no torch). `cpu_fraction` is THE definition used everywhere:

    cpu_fraction = fraction of a linear layer's output rows computed on the CPU, in [0, 1].
    With k = cpu_rows, the CPU computes rows [0, k) of W and the GPU rows [k, out).
    0 = the whole weight is streamed to the GPU; 1 = the CPU computes the whole layer.
    A *resident* linear keeps its whole weight on the GPU and is not split.

Prefill and decode each have their own split (docs/method.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt

from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.jsonio import write_document
from hetegen_cli.plan.sections import (
    Bounds,
    Budget,
    ExpertUseRecord,
    FormatChoice,
    LinearTimes,
    MemoryUse,
    ModelIdentity,
    Predictions,
    ProfileIdentity,
    RatesRecord,
    Residency,
    WeightDtype,
    Workload,
)

#: a runtime field that plans written before it lack: it loads with its default
SINCE_LATER = {"optional": True}

ROW_GRANULARITY = 16  # CPU/GPU split points are multiples of this many rows (or 0 / out)


def round_rows(fraction: float, out_features: int, granularity: int = ROW_GRANULARITY) -> int:
    """Rows for the CPU from a fraction, rounded to `granularity` (0 and out stay exact)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cpu_fraction {fraction} outside [0, 1]")
    if fraction >= 1.0:
        return out_features  # "the CPU computes the whole layer" must stay exact
    rows = round(fraction * out_features / granularity) * granularity
    return max(0, min(out_features, rows))


@dataclass(frozen=True)
class LinearPlacement:
    """Where one nn.Linear runs. Shapes: weight [out_features, in_features]."""

    name: str
    layer_index: int
    role: str
    out_features: int
    in_features: int
    resident: bool  # whole weight on the GPU; no split
    cpu_rows_prefill: int  # CPU computes rows [0, cpu_rows_prefill) in prefill
    cpu_rows_decode: int  # ... and rows [0, cpu_rows_decode) in decode

    @classmethod
    def of(
        cls, linear: Any, resident: bool = False, rows_prefill: int = 0, rows_decode: int = 0
    ) -> LinearPlacement:
        """The placement of `linear` (a models.shapes.spec.LinearSpec, or another placement: anything
        with its name, layer_index, role, out_features and in_features)."""
        return cls(
            linear.name,
            linear.layer_index,
            linear.role,
            linear.out_features,
            linear.in_features,
            resident,
            rows_prefill,
            rows_decode,
        )

    def __post_init__(self) -> None:
        for rows in (self.cpu_rows_prefill, self.cpu_rows_decode):
            if not 0 <= rows <= self.out_features:
                raise ValueError(f"{self.name}: cpu rows {rows} outside [0, {self.out_features}]")
        if self.resident and (self.cpu_rows_prefill or self.cpu_rows_decode):
            raise ValueError(f"{self.name}: a resident linear has no CPU rows")

    @property
    def cpu_fraction_prefill(self) -> float:
        return self.cpu_rows_prefill / self.out_features

    @property
    def cpu_fraction_decode(self) -> float:
        return self.cpu_rows_decode / self.out_features

    def cpu_rows(self, phase: str) -> int:
        """CPU rows for phase 'prefill' or 'decode'."""
        return self.cpu_rows_prefill if phase == "prefill" else self.cpu_rows_decode

    @property
    def max_cpu_rows(self) -> int:
        return max(self.cpu_rows_prefill, self.cpu_rows_decode)

    @property
    def max_gpu_stream_rows(self) -> int:
        """Rows that may cross PCIe in some phase (0 when resident)."""
        if self.resident:
            return 0
        return self.out_features - min(self.cpu_rows_prefill, self.cpu_rows_decode)


@dataclass(frozen=True)
class ExpertsPlacement:
    """Where the routed experts of one mixture-of-experts layer run (docs/plan.md, "Experts"):
    the experts numbered in `gpu` are resident on the GPU side, whole; every other one is
    computed by the CPU from host RAM, only when a token chose it (its activations cross PCIe,
    its weights never do), except in prefill with `stream_prefill`: then its weights cross.
    With `split_units` k > 0, in decode each chosen CPU-side expert is split by intermediate
    units as HeteGen splits a linear by rows: the weights of its first k units (gate and up
    rows, down columns) cross PCIe and the GPU computes them while the CPU computes the rest."""

    name: str  # the experts module, e.g. model.layers.0.mlp.experts
    layer_index: int
    num_experts: int
    gpu: tuple[int, ...] = ()  # expert numbers on the GPU side, ascending
    stream_prefill: bool = False  # prefill: the CPU-side experts are copied to the GPU and run there
    split_units: int = 0  # decode: intermediate units of each chosen CPU-side expert the GPU computes

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"{self.name}: {self.num_experts} experts")
        if list(self.gpu) != sorted(set(self.gpu)) or any(not 0 <= e < self.num_experts for e in self.gpu):
            raise ValueError(
                f"{self.name}: gpu experts {list(self.gpu)} are not distinct ascending numbers "
                f"in [0, {self.num_experts})"
            )
        if self.split_units < 0:
            raise ValueError(f"{self.name}: split_units {self.split_units} is negative")

    @classmethod
    def of(cls, experts: Any, gpu: Any = ()) -> ExpertsPlacement:
        """The placement of `experts` (a models.shapes.experts.ExpertsSpec or another
        placement) with the experts in `gpu` on the GPU side."""
        return cls(experts.name, experts.layer_index, experts.num_experts, tuple(sorted(gpu)))

    @property
    def cpu(self) -> tuple[int, ...]:
        """Expert numbers the CPU computes."""
        on_gpu = set(self.gpu)
        return tuple(e for e in range(self.num_experts) if e not in on_gpu)

    def to_dict(self) -> dict:
        return {f.name: list(self.gpu) if f.name == "gpu" else getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RuntimeSettings:
    """How the engine executes the placements. The one definition of a runtime setting: the
    plan document's `runtime` section is written from these fields and read back through
    their types (plan.load validates each against its annotation; a field marked
    SINCE_LATER may be absent in older plans, every other one is required)."""

    weights_dtype: WeightDtype = "float16"  # dtype of GPU-side (streamed and resident) weights
    cpu_dtype_prefill: WeightDtype = "float32"  # dtype the CPU share is computed in during prefill
    cpu_dtype_decode: WeightDtype = "float32"  # ... and during decode
    cpu_threads: Annotated[StrictInt, Field(ge=1, le=4096)] = 1  # intra-op threads for the CPU share
    staging_buffers: Annotated[StrictInt, Field(ge=0, le=64)] = 2  # GPU receive buffers for shares
    prefetch_depth: Annotated[StrictInt, Field(ge=0, le=64)] = 1  # shares issued ahead of use
    pin_weights: StrictBool = True  # pin host-held weights once at load
    lm_head_on_gpu: StrictBool = True  # the LM head stays resident (else planned as a linear)
    requires_gpu: StrictBool = True  # False for all-CPU plans
    # host-to-device copy engines the plan assumes (the profile's probe; 1 when unknown): with
    # one, the next weight copies are issued after a linear's join, so its small copy goes
    # first; with two or more, as soon as the linear starts (docs/engine.md)
    copy_engines: Annotated[StrictInt, Field(ge=1, le=64)] = field(default=1, metadata=SINCE_LATER)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, metadata=SINCE_LATER)

    @property
    def cpu_dtypes(self) -> tuple[str, str]:
        """(prefill, decode) CPU dtypes."""
        return self.cpu_dtype_prefill, self.cpu_dtype_decode

    @property
    def compute_label(self) -> str:
        """The formats this runtime computes in, e.g. 'float16+bfloat16' (weights dtype first)."""
        names = [self.weights_dtype]
        names += [d for d in self.cpu_dtypes if d not in names]
        return "+".join(names)


# --- the plan document ---------------------------------------------------------------------

PLAN_KIND = "hetegen.plan"
PLAN_SCHEMA_VERSION = 2  # 2: the CPU dtype per phase (runtime.cpu_dtype_prefill/_decode)
SUPPORTED_PLAN_VERSIONS = (1, 2)


@dataclass(frozen=True)
class LinearEstimate:
    """Planner figures for one linear, parallel to Plan.placements (empty for manual plans).

    prefill/decode: predicted seconds at the plan's split. priority_g: decode T_cpu at the
    balanced split per byte of GPU memory (s/B), docs/method.md §7.
    """

    weight_bytes: int
    priority_g: float
    prefill: LinearTimes
    decode: LinearTimes


@dataclass(frozen=True)
class Plan:
    """A complete plan: what `plan` writes and `run`/`bench` execute.

    placements are in execution order (block linears, then the LM head when it is planned as
    a linear, i.e. not resident with lm_head_on_gpu). Every section is typed (plan.sections);
    plans made from fractions (plan.manual) leave the planner's sections empty or None.
    """

    placements: tuple[LinearPlacement, ...]
    runtime: RuntimeSettings
    model: ModelIdentity
    workload: Workload
    budget: Budget = field(default_factory=Budget)
    memory: MemoryUse = field(default_factory=MemoryUse)
    profile: ProfileIdentity | None = None
    estimates: tuple[LinearEstimate, ...] = ()
    predictions: Predictions = field(default_factory=Predictions)
    bounds: Bounds | None = None
    residency: Residency | None = None
    rates: RatesRecord | None = None
    cpu_formats: FormatChoice | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    created_utc: str = ""
    #: `hetegen plan --simulate`: the trace replay of this plan (plan.simulate), a report
    simulation: dict = field(default_factory=dict)
    #: one per mixture-of-experts layer, in layer order (() for a dense model), and the use
    #: they were placed and priced by (plan.expert_use; None: a dense model or an older plan)
    experts: tuple[ExpertsPlacement, ...] = ()
    expert_use: ExpertUseRecord | None = None

    __hash__ = None  # type: ignore[assignment]  # holds a dict

    def placement(self, name: str) -> LinearPlacement:
        for p in self.placements:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def resident_count(self) -> int:
        return sum(p.resident for p in self.placements)

    @property
    def split_count(self) -> int:
        return len(self.placements) - self.resident_count

    def _experts_summary(self) -> dict:
        return {
            "experts_count": sum(x.num_experts for x in self.experts),
            "experts_on_gpu": sum(len(x.gpu) for x in self.experts),
            "expert_layers_streamed_in_prefill": sum(x.stream_prefill for x in self.experts),
            "expert_layers_split_in_decode": sum(bool(x.split_units and x.cpu) for x in self.experts),
        }

    def summary(self) -> dict:
        """What a reader of a run or bench result needs to know of this plan."""
        split = [p for p in self.placements if not p.resident]

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        memory, layer_split = self.memory, self.predictions.layer_split
        return {
            "model": self.model.name,
            "created_utc": self.created_utc,
            "budget": self.budget.to_dict(),
            "gpu_memory_bytes": memory.gpu.total_bytes if memory.gpu else None,
            "host_memory_bytes": memory.host.total_bytes if memory.host else None,
            "runtime": runtime_to_dict(self.runtime),
            "resident_count": self.resident_count,
            "split_count": len(split),
            "mean_cpu_fraction_prefill": mean([p.cpu_fraction_prefill for p in split]),
            "mean_cpu_fraction_decode": mean([p.cpu_fraction_decode for p in split]),
            "cpu_formats": (
                {k: v for k, v in self.cpu_formats.to_dict().items() if k in ("prefill", "decode", "reason")}
                if self.cpu_formats
                else {}
            ),
            "layer_split_gpu_layers": layer_split.gpu_layers if layer_split else None,
            **(self._experts_summary() if self.experts else {}),
            "predictions": self.predictions.to_dict(),
            "bounds": self.bounds.to_dict() if self.bounds else {},
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict:
        """The JSON document (schema_version and kind first)."""
        linears = []
        for i, p in enumerate(self.placements):
            entry = {
                "name": p.name,
                "layer_index": p.layer_index,
                "role": p.role,
                "shape": [p.out_features, p.in_features],
                "resident": p.resident,
                "cpu_fraction_prefill": p.cpu_fraction_prefill,
                "cpu_fraction_decode": p.cpu_fraction_decode,
                "cpu_rows_prefill": p.cpu_rows_prefill,
                "cpu_rows_decode": p.cpu_rows_decode,
            }
            if self.estimates:
                est = self.estimates[i]
                entry.update(
                    weight_bytes=est.weight_bytes,
                    priority_g_s_per_byte=est.priority_g,
                    prefill=est.prefill.to_dict(),
                    decode=est.decode.to_dict(),
                )
            linears.append(entry)
        optional = lambda section: section.to_dict() if section is not None else {}  # noqa: E731
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "kind": PLAN_KIND,
            "created_utc": self.created_utc,
            "model": self.model.to_dict(),
            "profile": self.profile.to_dict() if self.profile is not None else None,
            "workload": self.workload.to_dict(),
            "budget": self.budget.to_dict(),
            "memory": self.memory.to_dict(),
            "runtime": runtime_to_dict(self.runtime),
            "rates": optional(self.rates),
            "cpu_formats": optional(self.cpu_formats),
            "predictions": self.predictions.to_dict(),
            "bounds": optional(self.bounds),
            "residency": optional(self.residency),
            **({"simulation": self.simulation} if self.simulation else {}),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            **({"expert_use": self.expert_use.to_dict()} if self.expert_use else {}),
            **({"experts": [x.to_dict() for x in self.experts]} if self.experts else {}),
            "linears": linears,
        }


def runtime_to_dict(runtime: RuntimeSettings) -> dict:
    """The plan's `runtime` section: every field of RuntimeSettings, in order."""
    out = {f.name: getattr(runtime, f.name) for f in fields(runtime)}
    out["extra"] = dict(runtime.extra)
    return out


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan atomically (core.jsonio.write_document); returns the path."""
    return write_document(path, plan.to_dict())


# --- plans and model specs -----------------------------------------------------------------


def model_identity(spec: Any, arg: str = "") -> ModelIdentity:
    """The plan's `model` section for a models.shapes.spec.ModelSpec."""
    return ModelIdentity(
        arg=arg,
        name=spec.name,
        architecture=spec.architecture,
        dtype=spec.dtype,
        config_hash=spec.config_hash,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        linear_count=len(spec.linears),
        tie_word_embeddings=spec.tie_word_embeddings,
        weight_bytes=spec.total_weight_bytes,
        quant=spec.quant_label,
    )


def _quant_choice(label: str | None) -> str:
    """The --quant that gives a model stored as `label`: none, int8, int4; auto for a mixed
    model (int4-g32+int8: each linear as its GGUF stores it)."""
    if label is None:
        return "none"
    return "auto" if "+" in label else label.split("-")[0]


def check_plan_matches(plan: Plan, spec: Any) -> None:
    """PlanError unless `plan` was made for this model's shapes and dtype."""
    made_for = plan.model.name or plan.model.arg or "another model"
    hint = f"re-run `hetegen plan --model {spec.name}`"
    if plan.model.config_hash != spec.config_hash:
        raise PlanError(
            f"plan was made for model {made_for} (config hash "
            f"{plan.model.config_hash}), not {spec.name} ({spec.config_hash})",
            hint,
        )
    expected = {lin.name: (lin.out_features, lin.in_features) for lin in spec.linears}
    if not spec.tie_word_embeddings:
        expected[spec.lm_head.name] = (spec.lm_head.out_features, spec.lm_head.in_features)
    for p in plan.placements:
        if expected.get(p.name) != (p.out_features, p.in_features):
            raise PlanError(
                f"plan was made for model {made_for}: its linear {p.name} "
                f"{[p.out_features, p.in_features]} is not in {spec.name}",
                hint,
            )
    missing = set(lin.name for lin in spec.linears) - {p.name for p in plan.placements}
    if missing:
        raise PlanError(
            f"plan was made for model {made_for}: it lacks {len(missing)} linears of "
            f"{spec.name}, e.g. {sorted(missing)[0]}",
            hint,
        )
    _check_experts_match(plan, spec, made_for, hint)
    if spec.lm_head.name not in {p.name for p in plan.placements} and not plan.runtime.lm_head_on_gpu:
        raise PlanError("plan neither keeps the LM head on the GPU nor places it", hint)
    if plan.model.quant != spec.quant_label:
        stored = lambda label: f"quantized ({label})" if label else "in floating point"  # noqa: E731
        raise PlanError(
            f"plan was made for {made_for} stored {stored(plan.model.quant)}, but the model "
            f"is {stored(spec.quant_label)}",
            f"{hint} --quant {_quant_choice(spec.quant_label)}",
        )
    float32_rest = spec.quant_label and plan.runtime.weights_dtype == "float32"  # plan.all_cpu
    if plan.runtime.weights_dtype != spec.dtype and not float32_rest:
        raise PlanError(
            f"plan was made for {made_for} in {plan.runtime.weights_dtype}, but the "
            f"model is loaded in {spec.dtype}",
            f"{hint} --dtype {spec.dtype}, or load the model in {plan.runtime.weights_dtype}",
        )


def _check_experts_match(plan: Plan, spec: Any, made_for: str, hint: str) -> None:
    """PlanError unless the plan places exactly the model's experts modules, each with its
    number of experts."""
    want = {x.name: x.num_experts for x in spec.experts}
    have = {x.name: x.num_experts for x in plan.experts}
    for name, count in have.items():
        if want.get(name) != count:
            what = f"{count} experts at {name}"
            raise PlanError(f"plan was made for model {made_for}: it places {what}, not in {spec.name}", hint)
    missing = sorted(set(want) - set(have))
    if missing:
        raise PlanError(
            f"plan was made for model {made_for}: it places no experts of {spec.name}'s "
            f"{len(missing)} mixture-of-experts layers, e.g. {missing[0]}",
            hint,
        )
