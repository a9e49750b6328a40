"""Reading plan files: validate a (possibly hand-edited) plan document against its schema,
then build the Plan. Every field run and bench read is type- and range-checked, optional
sections included (docs/validation.md); PlanError names the file, the field and the value.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import Field, StrictInt, create_model, model_validator

from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.jsonio import read_document
from hetegen_cli.core.validation import (
    Count,
    Finite,
    Flag,
    Fraction,
    Index,
    NonNegative,
    Positive,
    Schema,
    Text,
    check,
)
from hetegen_cli.plan.document import (
    PLAN_KIND,
    SUPPORTED_PLAN_VERSIONS,
    LinearEstimate,
    LinearPlacement,
    Plan,
    RuntimeSettings,
    WeightDtype,
)

_HINT = "fix the value by hand or re-run `hetegen plan`"
Dim = Annotated[StrictInt, Field(ge=1, le=2**31)]


class PhaseTimes(Schema):
    cpu_s: NonNegative
    transfer_s: NonNegative
    gpu_s: NonNegative
    layer_s: NonNegative


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
    prefill: PhaseTimes | None = None
    decode: PhaseTimes | None = None

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


class ModelDoc(Schema):
    name: Text
    architecture: Text
    dtype: WeightDtype
    config_hash: Text
    arg: Text = ""
    weight_bytes: Index | None = None
    quant: Literal["int8", "int4-g32", "int4-g64", "int4-g128"] | None = None  # schema 2 from issue 11


class WorkloadDoc(Schema):
    prompt_len: Index
    max_new_tokens: Index
    batch_size: Count


class BudgetDoc(Schema):
    gpu_budget_bytes: Index | None = None
    cpu_budget_bytes: Index | None = None
    gpu_budget_source: Text | None = None
    cpu_budget_source: Text | None = None
    gpu_minimum_bytes: Index | None = None
    gpu_unused_bytes: Index | None = None


class MemoryDoc(Schema):
    gpu: dict[str, Index] = Field(default_factory=dict)
    host: dict[str, Index] = Field(default_factory=dict)


class Prediction(Schema):
    prefill_s: NonNegative
    decode_s_per_token: NonNegative
    decode_tokens_per_s: Positive | None
    end_to_end_tokens_per_s: Positive | None
    total_s: NonNegative
    gpu_memory_bytes: Index
    hetegen_decode_speedup: Positive | None = None
    hetegen_end_to_end_speedup: Positive | None = None
    gpu_layers: Index | None = None
    lm_head_on_gpu: Flag | None = None


class ProfileIdentity(Schema):
    path: Text | None = None
    created_utc: Text | None = None
    cpu_model: Text | None = None
    gpu_name: Text | None = None
    quick: Flag | None = None
    sha256: Text | None = None


class PlanDoc(Schema):
    schema_version: StrictInt
    kind: Literal["hetegen.plan"]
    created_utc: Text = ""
    model: ModelDoc
    profile: ProfileIdentity | None = None
    workload: WorkloadDoc
    budget: BudgetDoc = BudgetDoc()
    memory: MemoryDoc = MemoryDoc()
    runtime: RuntimeDoc
    rates: dict[str, Any] = Field(default_factory=dict)
    cpu_formats: dict[str, Any] = Field(default_factory=dict)
    predictions: dict[str, Prediction | None] = Field(default_factory=dict)
    bounds: dict[str, Finite | None] = Field(default_factory=dict)
    residency: dict[str, Any] = Field(default_factory=dict)
    simulation: dict[str, Any] = Field(default_factory=dict)  # plan --simulate; optional
    warnings: list[Text] = Field(default_factory=list)
    notes: list[Text] = Field(default_factory=list)
    linears: Annotated[list[LinearDoc], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> PlanDoc:
        names = [lin.name for lin in self.linears]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"the plan lists linear {twice!r} twice")
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
                LinearEstimate(
                    lin.weight_bytes,
                    lin.priority_g_s_per_byte or 0.0,
                    lin.prefill.model_dump(),
                    lin.decode.model_dump(),
                )
            )
    rt = parsed.runtime
    runtime = RuntimeSettings(**{f.name: getattr(rt, f.name) for f in fields(RuntimeSettings)})
    return Plan(
        placements=tuple(placements),
        runtime=runtime,
        model=dict(doc["model"]),
        workload=dict(doc["workload"]),
        budget=dict(doc.get("budget") or {}),
        memory=dict(doc.get("memory") or {}),
        profile=doc.get("profile"),
        estimates=tuple(estimates) if len(estimates) == len(placements) else (),
        predictions=dict(doc.get("predictions") or {}),
        bounds=dict(doc.get("bounds") or {}),
        residency=dict(doc.get("residency") or {}),
        rates=dict(doc.get("rates") or {}),
        cpu_formats=dict(parsed.cpu_formats),
        warnings=tuple(parsed.warnings),
        notes=tuple(parsed.notes),
        created_utc=parsed.created_utc,
        simulation=dict(parsed.simulation),
    )


def _upgrade(doc: dict) -> dict:
    """A schema-1 plan in the current schema: its one `runtime.cpu_dtype` serves both phases.
    (A copy; a runtime that is not an object is left for the schema to reject.)"""
    runtime = doc.get("runtime")
    if doc.get("schema_version") != 1 or not isinstance(runtime, dict) or "cpu_dtype" not in runtime:
        return doc
    runtime = {k: v for k, v in runtime.items() if k != "cpu_dtype"}
    runtime["cpu_dtype_prefill"] = runtime["cpu_dtype_decode"] = doc["runtime"]["cpu_dtype"]
    return {**doc, "runtime": runtime}
