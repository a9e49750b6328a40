"""Reading plan files: parse and validate a (possibly hand-edited) plan document into a Plan.

Errors are PlanError naming the file, the linear and the field, with a hint to re-plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import PlanError
from hetegen_cli.core.jsonio import read_document
from hetegen_cli.plan.document import (
    PHASES,
    PLAN_KIND,
    SUPPORTED_PLAN_VERSIONS,
    LinearEstimate,
    LinearPlacement,
    Plan,
    RuntimeSettings,
)

_REPLAN = "re-run `hetegen plan`"
_TIME_FIELDS = ("cpu_s", "transfer_s", "gpu_s", "layer_s")


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (PlanError on corrupt, foreign or hand-broken files)."""
    doc = read_document(path, PLAN_KIND, SUPPORTED_PLAN_VERSIONS, PlanError, "hetegen plan")
    try:
        return plan_from_dict(doc)
    except PlanError as exc:
        raise PlanError(f"plan {path}: {exc.message}", exc.hint) from None


def _bad(message: str) -> PlanError:
    return PlanError(message, f"fix the value by hand or {_REPLAN}")


def _field(d: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _bad(f"{where} lacks field {key!r}")
    value = d[key]
    kinds = (int, float) if kind is float else (kind if isinstance(kind, tuple) else (kind,))
    if isinstance(value, bool) and bool not in kinds:
        raise _bad(f"{where} field {key!r} is {value!r}, not a number")
    if not isinstance(value, kinds):
        raise _bad(f"{where} field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_sizes(tree: Any, where: str) -> None:
    """Every *_bytes value in a nested dict must be a non-negative integer."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key.endswith("_bytes") and value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise _bad(f"{where}.{key} is {value!r}; sizes must be whole bytes >= 0")
            else:
                _check_sizes(value, f"{where}.{key}")


def _placement_from(entry: dict, index: int) -> tuple[LinearPlacement, LinearEstimate | None]:
    where = f"linear #{index}"
    name = _field(entry, "name", str, where)
    where = f"linear {name}"
    shape = _field(entry, "shape", list, where)
    if len(shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise _bad(f"{where} field 'shape' is {shape!r}; expected [out_features, in_features] > 0")
    out, inp = shape
    resident = _field(entry, "resident", bool, where)
    rows = {}
    for phase in PHASES:
        frac = _field(entry, f"cpu_fraction_{phase}", float, where)
        if not 0.0 <= frac <= 1.0:
            raise _bad(f"{where} field 'cpu_fraction_{phase}' is {frac}; it must lie in [0, 1]")
        r = _field(entry, f"cpu_rows_{phase}", int, where)
        if not 0 <= r <= out:
            raise _bad(f"{where} field 'cpu_rows_{phase}' is {r}; it must lie in [0, {out}]")
        if abs(frac * out - r) > 0.5:
            raise _bad(
                f"{where} fields 'cpu_rows_{phase}' ({r}) and 'cpu_fraction_{phase}' "
                f"({frac}) disagree: rows must be round(fraction * {out})"
            )
        if resident and r:
            raise _bad(
                f"{where} is resident but field 'cpu_rows_{phase}' is {r}; a resident linear has no CPU rows"
            )
        rows[phase] = r
    placement = LinearPlacement(
        name,
        _field(entry, "layer_index", int, where),
        _field(entry, "role", str, where),
        out,
        inp,
        resident,
        rows["prefill"],
        rows["decode"],
    )
    estimate = None
    if "prefill" in entry and "decode" in entry:
        times = {}
        for phase in PHASES:
            t = _field(entry, phase, dict, where)
            for key in _TIME_FIELDS:
                value = _field(t, key, float, f"{where}.{phase}")
                if value < 0:
                    raise _bad(f"{where} field '{phase}.{key}' is negative ({value})")
            times[phase] = dict(t)
        wb = _field(entry, "weight_bytes", int, where)
        if wb < 0:
            raise _bad(f"{where} field 'weight_bytes' is negative ({wb})")
        estimate = LinearEstimate(
            wb, float(entry.get("priority_g_s_per_byte", 0.0)), times["prefill"], times["decode"]
        )
    return placement, estimate


def _runtime_from(d: dict) -> RuntimeSettings:
    where = "runtime"
    for key in ("weights_dtype", "cpu_dtype"):
        if _field(d, key, str, where) not in WEIGHT_DTYPES:
            raise _bad(f"runtime field {key!r} is {d[key]!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    for key, low in (("cpu_threads", 1), ("staging_buffers", 0), ("prefetch_depth", 0)):
        if _field(d, key, int, where) < low:
            raise _bad(f"runtime field {key!r} is {d[key]}; it must be >= {low}")
    return RuntimeSettings(
        weights_dtype=d["weights_dtype"],
        cpu_dtype=d["cpu_dtype"],
        cpu_threads=d["cpu_threads"],
        staging_buffers=d["staging_buffers"],
        prefetch_depth=d["prefetch_depth"],
        pin_weights=_field(d, "pin_weights", bool, where),
        lm_head_on_gpu=_field(d, "lm_head_on_gpu", bool, where),
        requires_gpu=_field(d, "requires_gpu", bool, where),
        extra=dict(d.get("extra") or {}),
    )


def plan_from_dict(doc: dict) -> Plan:
    if doc.get("kind") != PLAN_KIND or doc.get("schema_version") not in SUPPORTED_PLAN_VERSIONS:
        raise PlanError(
            f"not a {PLAN_KIND} document of schema version "
            f"{', '.join(map(str, SUPPORTED_PLAN_VERSIONS))} "
            f"(kind={doc.get('kind')!r}, schema_version={doc.get('schema_version')!r})",
            f"{_REPLAN} with this version of hetegen",
        )
    entries = _field(doc, "linears", list, "plan")
    if not entries:
        raise _bad("plan has no linears")
    parsed = [_placement_from(e, i) for i, e in enumerate(entries)]
    names = [p.name for p, _ in parsed]
    if len(set(names)) != len(names):
        raise _bad("plan lists a linear twice")
    estimates = tuple(e for _, e in parsed)
    for section in ("budget", "memory"):
        _check_sizes(doc.get(section) or {}, section)
    return Plan(
        placements=tuple(p for p, _ in parsed),
        runtime=_runtime_from(_field(doc, "runtime", dict, "plan")),
        model=_field(doc, "model", dict, "plan"),
        workload=_field(doc, "workload", dict, "plan"),
        budget=dict(doc.get("budget") or {}),
        memory=dict(doc.get("memory") or {}),
        profile=doc.get("profile"),
        estimates=estimates if all(e is not None for e in estimates) else (),
        predictions=dict(doc.get("predictions") or {}),
        bounds=dict(doc.get("bounds") or {}),
        residency=dict(doc.get("residency") or {}),
        rates=dict(doc.get("rates") or {}),
        warnings=tuple(doc.get("warnings") or ()),
        notes=tuple(doc.get("notes") or ()),
        created_utc=str(doc.get("created_utc") or ""),
    )
