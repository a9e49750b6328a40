"""The plan: per-linear placement decisions that `plan` writes and `run`/`bench` execute.

Pure Python (no torch). `cpu_fraction` is THE definition used everywhere:

    cpu_fraction = fraction of a linear layer's output rows computed on the CPU, in [0, 1].
    With k = cpu_rows, the CPU computes rows [0, k) of W and the GPU rows [k, out).
    0 = the whole weight is streamed to the GPU; 1 = the CPU computes the whole layer.
    A *resident* linear keeps its whole weight on the GPU and is not split.

Prefill and decode each have their own split (method.md section 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    resident: bool                 # whole weight on the GPU; no split
    cpu_rows_prefill: int          # CPU computes rows [0, cpu_rows_prefill) in prefill
    cpu_rows_decode: int           # ... and rows [0, cpu_rows_decode) in decode

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
class RuntimeSettings:
    """How the engine executes the placements."""

    weights_dtype: str = "float16"   # dtype of GPU-side (streamed and resident) weights
    cpu_dtype: str = "float32"       # dtype the CPU share is computed in
    cpu_threads: int = 1             # torch intra-op threads for the CPU share
    staging_buffers: int = 2         # rotating GPU receive buffers for streamed shares
    prefetch_depth: int = 1          # streamed shares issued ahead of the one computing
    pin_weights: bool = True         # pin host-held weights once at load
    lm_head_on_gpu: bool = True      # the LM head stays resident (else planned as a linear)
    requires_gpu: bool = True        # False for all-CPU plans
    extra: dict = field(default_factory=dict, compare=False)


# --- the plan document ---------------------------------------------------------------------

PLAN_KIND = "hetegen.plan"
PLAN_SCHEMA_VERSION = 1
SUPPORTED_PLAN_VERSIONS = (1,)
_REPLAN = "re-run `hetegen plan`"
PHASES = ("prefill", "decode")
_TIME_FIELDS = ("cpu_s", "transfer_s", "gpu_s", "layer_s")


@dataclass(frozen=True)
class LinearEstimate:
    """Planner figures for one linear, parallel to Plan.placements (empty for manual plans).

    prefill/decode: predicted seconds {cpu_s, transfer_s, gpu_s, layer_s} at the plan's split.
    priority_g: decode T_cpu at the balanced split per byte of GPU memory (s/B), method.md 7.
    """

    weight_bytes: int
    priority_g: float
    prefill: dict
    decode: dict


@dataclass(frozen=True)
class Plan:
    """A complete plan: what `plan` writes and `run`/`bench` execute.

    placements are in execution order (block linears, then the LM head when it is planned as
    a linear, i.e. not resident with lm_head_on_gpu). Sizes in bytes, times in seconds.
    """

    placements: tuple[LinearPlacement, ...]
    runtime: RuntimeSettings
    model: dict                         # arg, name, architecture, dtype, config_hash, ...
    workload: dict                      # prompt_len, max_new_tokens, batch_size
    budget: dict = field(default_factory=dict)     # gpu_budget_bytes, cpu_budget_bytes, ...
    memory: dict = field(default_factory=dict)     # {"gpu": {item_bytes}, "host": {item_bytes}}
    profile: dict | None = None         # path, created_utc, cpu_model, gpu_name, sha256
    estimates: tuple[LinearEstimate, ...] = ()
    predictions: dict = field(default_factory=dict)  # strategy -> figures
    bounds: dict = field(default_factory=dict)
    residency: dict = field(default_factory=dict)    # how the resident set was chosen
    rates: dict = field(default_factory=dict)        # costmodel.Rates used
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    created_utc: str = ""

    __hash__ = None  # type: ignore[assignment]  # holds dicts

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

    def to_dict(self) -> dict:
        """The JSON document (schema_version and kind first)."""
        linears = []
        for i, p in enumerate(self.placements):
            entry = {
                "name": p.name, "layer_index": p.layer_index, "role": p.role,
                "shape": [p.out_features, p.in_features], "resident": p.resident,
                "cpu_fraction_prefill": p.cpu_fraction_prefill,
                "cpu_fraction_decode": p.cpu_fraction_decode,
                "cpu_rows_prefill": p.cpu_rows_prefill, "cpu_rows_decode": p.cpu_rows_decode,
            }
            if self.estimates:
                est = self.estimates[i]
                entry.update(weight_bytes=est.weight_bytes, priority_g_s_per_byte=est.priority_g,
                             prefill=dict(est.prefill), decode=dict(est.decode))
            linears.append(entry)
        return {
            "schema_version": PLAN_SCHEMA_VERSION, "kind": PLAN_KIND,
            "created_utc": self.created_utc, "model": self.model, "profile": self.profile,
            "workload": self.workload, "budget": self.budget, "memory": self.memory,
            "runtime": runtime_to_dict(self.runtime), "rates": self.rates,
            "predictions": self.predictions, "bounds": self.bounds,
            "residency": self.residency, "warnings": list(self.warnings),
            "notes": list(self.notes), "linears": linears,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> "Plan":
        """Parse and validate a plan document; PlanError names the bad linear and field."""
        return _plan_from_dict(doc)


def runtime_to_dict(runtime: RuntimeSettings) -> dict:
    return {
        "weights_dtype": runtime.weights_dtype, "cpu_dtype": runtime.cpu_dtype,
        "cpu_threads": runtime.cpu_threads, "staging_buffers": runtime.staging_buffers,
        "prefetch_depth": runtime.prefetch_depth, "pin_weights": runtime.pin_weights,
        "lm_head_on_gpu": runtime.lm_head_on_gpu, "requires_gpu": runtime.requires_gpu,
        "extra": dict(runtime.extra),
    }


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan atomically (jsonio.write_document); returns the path."""
    from hetegen_cli.jsonio import write_document

    return write_document(path, plan.to_dict())


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (PlanError on corrupt, foreign or hand-broken files)."""
    from hetegen_cli.errors import PlanError
    from hetegen_cli.jsonio import read_document

    doc = read_document(path, PLAN_KIND, SUPPORTED_PLAN_VERSIONS, PlanError, "hetegen plan")
    try:
        return _plan_from_dict(doc)
    except PlanError as exc:
        raise PlanError(f"plan {path}: {exc.message}", exc.hint) from None

# --- validation of (possibly hand-edited) documents ----------------------------------------

def _bad(message: str):
    from hetegen_cli.errors import PlanError

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
            raise _bad(f"{where} fields 'cpu_rows_{phase}' ({r}) and 'cpu_fraction_{phase}' "
                       f"({frac}) disagree: rows must be round(fraction * {out})")
        if resident and r:
            raise _bad(f"{where} is resident but field 'cpu_rows_{phase}' is {r}; a resident "
                       "linear has no CPU rows")
        rows[phase] = r
    placement = LinearPlacement(name, _field(entry, "layer_index", int, where),
                                _field(entry, "role", str, where), out, inp, resident,
                                rows["prefill"], rows["decode"])
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
        estimate = LinearEstimate(wb, float(entry.get("priority_g_s_per_byte", 0.0)),
                                  times["prefill"], times["decode"])
    return placement, estimate


def _runtime_from(d: dict) -> RuntimeSettings:
    from hetegen_cli.model_spec import DTYPE_BYTES

    where = "runtime"
    for key in ("weights_dtype", "cpu_dtype"):
        if _field(d, key, str, where) not in DTYPE_BYTES:
            raise _bad(f"runtime field {key!r} is {d[key]!r}; use one of {', '.join(DTYPE_BYTES)}")
    for key, low in (("cpu_threads", 1), ("staging_buffers", 0), ("prefetch_depth", 0)):
        if _field(d, key, int, where) < low:
            raise _bad(f"runtime field {key!r} is {d[key]}; it must be >= {low}")
    return RuntimeSettings(
        weights_dtype=d["weights_dtype"], cpu_dtype=d["cpu_dtype"], cpu_threads=d["cpu_threads"],
        staging_buffers=d["staging_buffers"], prefetch_depth=d["prefetch_depth"],
        pin_weights=_field(d, "pin_weights", bool, where),
        lm_head_on_gpu=_field(d, "lm_head_on_gpu", bool, where),
        requires_gpu=_field(d, "requires_gpu", bool, where), extra=dict(d.get("extra") or {}))


def _plan_from_dict(doc: dict) -> Plan:
    if doc.get("kind") != PLAN_KIND or doc.get("schema_version") not in SUPPORTED_PLAN_VERSIONS:
        from hetegen_cli.errors import PlanError

        raise PlanError(f"not a {PLAN_KIND} document of schema version "
                        f"{', '.join(map(str, SUPPORTED_PLAN_VERSIONS))} "
                        f"(kind={doc.get('kind')!r}, schema_version={doc.get('schema_version')!r})",
                        f"{_REPLAN} with this version of hetegen")
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
        model=_field(doc, "model", dict, "plan"), workload=_field(doc, "workload", dict, "plan"),
        budget=dict(doc.get("budget") or {}), memory=dict(doc.get("memory") or {}),
        profile=doc.get("profile"),
        estimates=estimates if all(e is not None for e in estimates) else (),
        predictions=dict(doc.get("predictions") or {}), bounds=dict(doc.get("bounds") or {}),
        residency=dict(doc.get("residency") or {}),
        rates=dict(doc.get("rates") or {}), warnings=tuple(doc.get("warnings") or ()),
        notes=tuple(doc.get("notes") or ()), created_utc=str(doc.get("created_utc") or ""),
    )


# --- plans and model specs -----------------------------------------------------------------

def model_identity(spec: Any, arg: str = "") -> dict:
    """The plan's `model` section for a model_spec.ModelSpec."""
    return {"arg": arg, "name": spec.name, "architecture": spec.architecture, "dtype": spec.dtype,
            "config_hash": spec.config_hash, "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size, "linear_count": len(spec.linears),
            "tie_word_embeddings": spec.tie_word_embeddings,
            "weight_bytes": spec.total_weight_bytes}


def check_plan_matches(plan: Plan, spec: Any) -> None:
    """PlanError unless `plan` was made for this model's shapes and dtype."""
    from hetegen_cli.errors import PlanError

    made_for = plan.model.get("name") or plan.model.get("arg") or "another model"
    hint = f"re-run `hetegen plan --model {spec.name}`"
    if plan.model.get("config_hash") != spec.config_hash:
        raise PlanError(f"plan was made for model {made_for} (config hash "
                        f"{plan.model.get('config_hash')}), not {spec.name} ({spec.config_hash})",
                        hint)
    expected = {l.name: (l.out_features, l.in_features) for l in spec.linears}
    if not spec.tie_word_embeddings:
        expected[spec.lm_head.name] = (spec.lm_head.out_features, spec.lm_head.in_features)
    for p in plan.placements:
        if expected.get(p.name) != (p.out_features, p.in_features):
            raise PlanError(f"plan was made for model {made_for}: its linear {p.name} "
                            f"{[p.out_features, p.in_features]} is not in {spec.name}", hint)
    missing = set(l.name for l in spec.linears) - {p.name for p in plan.placements}
    if missing:
        raise PlanError(f"plan was made for model {made_for}: it lacks {len(missing)} linears of "
                        f"{spec.name}, e.g. {sorted(missing)[0]}", hint)
    if spec.lm_head.name not in {p.name for p in plan.placements} and not plan.runtime.lm_head_on_gpu:
        raise PlanError("plan neither keeps the LM head on the GPU nor places it", hint)
    if plan.runtime.weights_dtype != spec.dtype:
        raise PlanError(f"plan was made for {made_for} in {plan.runtime.weights_dtype}, but the "
                        f"model is loaded in {spec.dtype}",
                        f"{hint} --dtype {spec.dtype}, or load the model in "
                        f"{plan.runtime.weights_dtype}")


def manual_plan(spec: Any, *, cpu_fraction_prefill: float | dict, cpu_fraction_decode: float | dict,
                resident: tuple | list | set = (), runtime: RuntimeSettings | None = None,
                workload: dict | None = None) -> Plan:
    """A plan from given fractions (tests, engine, bench arms); no predictions.

    Fractions are one float for every linear or a dict name -> float (missing names: 0).
    `resident` names linears kept whole on the GPU. The untied LM head is planned as a
    linear when runtime.lm_head_on_gpu is False.
    """
    runtime = runtime or RuntimeSettings(weights_dtype=spec.dtype)
    linears = list(spec.linears)
    if not runtime.lm_head_on_gpu:
        linears.append(spec.lm_head)
    known = {l.name for l in linears}
    resident = set(resident)

    def frac(value: float | dict, name: str) -> float:
        return float(value.get(name, 0.0)) if isinstance(value, dict) else float(value)

    for table in (cpu_fraction_prefill, cpu_fraction_decode, resident):
        unknown = set(table) - known if isinstance(table, (dict, set)) else set()
        if unknown:
            raise ValueError(f"unknown linear names: {sorted(unknown)[:3]}")
    placements = []
    for l in linears:
        is_res = l.name in resident
        rows = {ph: 0 if is_res else round_rows(frac(f, l.name), l.out_features)
                for ph, f in (("prefill", cpu_fraction_prefill), ("decode", cpu_fraction_decode))}
        placements.append(LinearPlacement(l.name, l.layer_index, l.role, l.out_features,
                                          l.in_features, is_res, rows["prefill"], rows["decode"]))
    workload = workload or {"prompt_len": 0, "max_new_tokens": 0, "batch_size": 1}
    return Plan(placements=tuple(placements), runtime=runtime, model=model_identity(spec),
                workload=dict(workload), notes=("manual plan: fractions given, not solved",))
