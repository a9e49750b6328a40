"""Reading plan files: validate a (possibly hand-edited) plan document against its schema,
then build the Plan. Every field run and bench read is type- and range-checked, optional
sections included (docs/validation.md); PlanError names the file, the field and the value.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import Field, StrictBool, StrictInt, create_model, model_validator

from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.jsonio import read_document
from hetegen_cli.core.validation import Flag, Fraction, Index, NonNegative, Schema, Text, check
from hetegen_cli.plan import sections as sec
from hetegen_cli.plan.document import (
    PLAN_KIND,
    SUPPORTED_PLAN_VERSIONS,
    ExpertsPlacement,
    LinearEstimate,
    LinearPlacement,
    Plan,
    RuntimeSettings,
)

_HINT = "fix the value by hand or re-run `hetegen plan`"
Dim = Annotated[StrictInt, Field(ge=1, le=2**31)]


class LinearDoc(Schema):
    name: Annotated[Text, Field(min_length=1)]
    layer_index: Annotated[StrictInt, Field(ge=-1, le=2**20)]
    role: Text
    shape: Annotated[list[Dim], Field(min_length=2, max_length=2)]
    resident: Flag
    cpu_fraction_prefill: Fraction
    cpu_fraction_decode: Fraction
    cpu_rows_prefill: Index
    cpu_rows_decode: Index
    weight_bytes: Index | None = None
    priority_g_s_per_byte: NonNegative | None = None
    prefill: sec.LinearTimes | None = None
    decode: sec.LinearTimes | None = None

    @model_validator(mode="after")
    def _rows_agree(self) -> LinearDoc:
        out = self.shape[0]
        for phase in ("prefill", "decode"):
            rows, fraction = getattr(self, f"cpu_rows_{phase}"), getattr(self, f"cpu_fraction_{phase}")
            if rows > out:
                raise ValueError(f"cpu_rows_{phase} {rows} exceeds out_features {out}")
            if abs(fraction * out - rows) > 0.5:
                raise ValueError(
                    f"cpu_rows_{phase} ({rows}) and cpu_fraction_{phase} ({fraction}) "
                    f"disagree: rows must be round(fraction * {out})"
                )
            if self.resident and rows:
                raise ValueError(f"a resident linear has no CPU rows, but cpu_rows_{phase} is {rows}")
        return self


class ExpertsDoc(Schema):
    """One MoE layer's experts placement (plan.document.ExpertsPlacement)."""

    name: Annotated[Text, Field(min_length=1)]
    layer_index: Annotated[StrictInt, Field(ge=0, le=2**20)]
    num_experts: Annotated[StrictInt, Field(ge=1, le=2**20)]
    gpu: list[Index]
    stream_prefill: StrictBool = False  # absent in older plans
    split_units: Annotated[StrictInt, Field(ge=0, le=2**24)] = 0  # absent in older plans

    @model_validator(mode="after")
    def _experts_in_range(self) -> ExpertsDoc:
        if self.gpu != sorted(set(self.gpu)):
            raise ValueError(f"gpu experts {self.gpu} are not distinct and ascending")
        if self.gpu and self.gpu[-1] >= self.num_experts:
            raise ValueError(f"gpu expert {self.gpu[-1]} is not below num_experts {self.num_experts}")
        return self


def _runtime_doc() -> type[Schema]:
    """The schema of a plan's `runtime` section, from RuntimeSettings' own fields and types
    (plan.document): a setting is defined once."""
    hints = get_type_hints(RuntimeSettings, include_extras=True)
    specs: dict[str, Any] = {}
    for f in fields(RuntimeSettings):
        if not f.metadata.get("optional"):
            specs[f.name] = (hints[f.name], ...)
        elif f.default_factory is not MISSING:
            specs[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            specs[f.name] = (hints[f.name], f.default)
    return create_model("RuntimeDoc", __base__=Schema, **specs)


RuntimeDoc = _runtime_doc()


#: the plan's typed sections (plan.sections), read into Plan as they are
SECTIONS = (
    "model",
    "profile",
    "workload",
    "budget",
    "memory",
    "rates",
    "cpu_formats",
    "predictions",
    "bounds",
    "residency",
    "expert_use",
)


class PlanDoc(Schema):
    schema_version: StrictInt
    kind: Literal["hetegen.plan"]
    created_utc: Text = ""
    model: sec.ModelIdentity
    profile: sec.ProfileIdentity | None = None
    workload: sec.Workload
    budget: sec.Budget = sec.Budget()
    memory: sec.MemoryUse = sec.MemoryUse()
    runtime: RuntimeDoc
    rates: sec.RatesRecord | None = None
    cpu_formats: sec.FormatChoice | None = None
    predictions: sec.Predictions = sec.Predictions()
    bounds: sec.Bounds | None = None
    residency: sec.Residency | None = None
    simulation: dict[str, Any] = Field(default_factory=dict)  # plan --simulate; optional
    warnings: list[Text] = Field(default_factory=list)
    notes: list[Text] = Field(default_factory=list)
    expert_use: sec.ExpertUseRecord | None = None  # MoE plans; absent in older plans
    experts: list[ExpertsDoc] = Field(default_factory=list)  # MoE models; absent in older plans
    linears: Annotated[list[LinearDoc], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> PlanDoc:
        for what, names in (
            ("linear", [x.name for x in self.linears]),
            ("experts", [x.name for x in self.experts]),
        ):
            if len(set(names)) != len(names):
                twice = next(n for n in names if names.count(n) > 1)
                raise ValueError(f"the plan lists {what} {twice!r} twice")
        return self


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (PlanError on corrupt, foreign or hand-broken files)."""
    doc = read_document(path, PLAN_KIND, SUPPORTED_PLAN_VERSIONS, PlanError, "hetegen plan")
    return plan_from_dict(doc, f"plan {path}")


def plan_from_dict(doc: dict, source: str = "plan") -> Plan:
    """Validate a plan document and build the Plan; PlanError names the bad field."""
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != PLAN_KIND
        or doc.get("schema_version") not in SUPPORTED_PLAN_VERSIONS
    ):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        version = doc.get("schema_version") if isinstance(doc, dict) else None
        raise PlanError(
            f"{source} is not a {PLAN_KIND} document of schema version "
            f"{', '.join(map(str, SUPPORTED_PLAN_VERSIONS))} (kind={kind!r}, "
            f"schema_version={version!r})",
            "re-run `hetegen plan` with this version of hetegen",
        )
    doc = _upgrade(doc)
    parsed = check(PlanDoc, doc, source=source, error=PlanError, hint=_HINT)
    placements, estimates = [], []
    for lin in parsed.linears:
        out, inp = lin.shape
        placements.append(
            LinearPlacement(
                lin.name,
                lin.layer_index,
                lin.role,
                out,
                inp,
                lin.resident,
                lin.cpu_rows_prefill,
                lin.cpu_rows_decode,
            )
        )
        if lin.prefill is not None and lin.decode is not None and lin.weight_bytes is not None:
            estimates.append(
                LinearEstimate(lin.weight_bytes, lin.priority_g_s_per_byte or 0.0, lin.prefill, lin.decode)
            )
    rt = parsed.runtime
    runtime = RuntimeSettings(**{f.name: getattr(rt, f.name) for f in fields(RuntimeSettings)})
    return Plan(
        placements=tuple(placements),
        runtime=runtime,
        estimates=tuple(estimates) if len(estimates) == len(placements) else (),
        **{name: getattr(parsed, name) for name in SECTIONS},
        warnings=tuple(parsed.warnings),
        notes=tuple(parsed.notes),
        created_utc=parsed.created_utc,
        simulation=dict(parsed.simulation),
        experts=tuple(
            ExpertsPlacement(
                x.name, x.layer_index, x.num_experts, tuple(x.gpu), x.stream_prefill, x.split_units
            )
            for x in parsed.experts
        ),
    )


#: sections a plan made from fractions writes as {} (no planner figures): read as absent
_EMPTY_IS_ABSENT = ("rates", "cpu_formats", "bounds", "residency")


def _upgrade(doc: dict) -> dict:
    """An older plan in the current schema (a copy): empty planner sections are absent, and a
    schema-1 plan's one `runtime.cpu_dtype` serves both phases (a runtime that is not an
    object is left for the schema to reject)."""
    doc = {k: v for k, v in doc.items() if not (k in _EMPTY_IS_ABSENT and v == {})}
    runtime = doc.get("runtime")
    if doc.get("schema_version") != 1 or not isinstance(runtime, dict) or "cpu_dtype" not in runtime:
        return doc
    runtime = {k: v for k, v in runtime.items() if k != "cpu_dtype"}
    runtime["cpu_dtype_prefill"] = runtime["cpu_dtype_decode"] = doc["runtime"]["cpu_dtype"]
    return {**doc, "runtime": runtime}
