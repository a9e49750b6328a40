"""The engine's fixed costs: what a step pays besides its linears (pure Python).

One name for them everywhere: *fixed costs* (the profile's `engine` section holds their
measurements).

`hetegen profile` measures them through the real model and engine on tiny synthetic models
(measure.engine_costs; the profile's `engine` section). Here they are fitted into per-phase terms
and scaled to a model's shapes (docs/plan.md §1d):

    per decoder layer  = a + c * n * d + e * n * ctx * q + b * ctx * kv     (seconds)
    per step           = s0 + s1 * n + sample * V                          (outside the layers)
    per linear         = the engine's cost of its mode (inline / split / stream; 0 resident)

n = tokens in the step (batch x prompt in prefill, batch in decode), d = hidden size, q = query
width (heads x head_dim), kv = KV-cache bytes per token and layer, ctx = the context the step
attends to (the prompt in prefill, the mean decode context in decode), V = vocabulary size. In
prefill `c` and `e` carry the elementwise work and the attention; in decode `b` carries the
attention's reads of the KV cache and its append (in place since models.loading.cache's
GrowingLayer; transformers' DynamicCache copied the whole cache every step). These terms
replace the attention term of the bandwidth model on the same device, so nothing is counted
twice (costmodel.strategies adds each term once). A calibration
(costmodel.calibration) scales them per device and phase from real runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.models.shapes.spec import ModelSpec
from hetegen_cli.plan.document import LinearPlacement
from hetegen_cli.profile.document import EngineEntry, EngineModel, Profile, profile_sections

MODES = ("inline", "split", "stream")
QUANT_ENTRY = "int4"  # the weights of the profile's quantized entries
NO_QUANT_NOTE = (
    "the profile measured no quantized model's fixed costs (made before 2026-12-07): a quantized "
    "model's CPU decode is priced with the float model's and a GEMV call cost per linear, which "
    "overstates it; re-run `hetegen profile`"
)
NO_MOE_NOTE = (
    "the profile measured no quantized mixture-of-experts model's fixed costs (made before "
    "2026-12-08): a quantized MoE model's CPU decode is priced with the float model's and a "
    "GEMV call cost per linear, which overstates it; re-run `hetegen profile`"
)
NO_ENGINE_NOTE = (
    "the profile has no engine costs (made before profile schema 2): predictions leave out "
    "the non-linear work (norms, rotary, KV cache, sampling) and the engine's cost per linear; "
    "re-run `hetegen profile`"
)


# --- fitting ---------------------------------------------------------------------------------


def nonnegative_fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares y ~ rows @ coef with every coef >= 0 (few unknowns: every subset of free
    coefficients is solved exactly and the feasible one with the smallest residual kept)."""
    k = len(rows[0]) if rows else 0
    best: tuple[float, list[float]] = (sum(y * y for y in ys), [0.0] * k)
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            coef = _solve_ls([[r[c] for c in cols] for r in rows], ys)
            if coef is None or any(v < 0 for v in coef):
                continue
            full = [0.0] * k
            for c, v in zip(cols, coef, strict=False):
                full[c] = v
            resid = sum(
                (y - sum(a * b for a, b in zip(r, full, strict=False))) ** 2
                for r, y in zip(rows, ys, strict=False)
            )
            if resid < best[0] * (1 - 1e-12):
                best = (resid, full)
    return best[1]


def _solve_ls(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """Ordinary least squares (numpy, columns scaled to 1 first so units do not matter);
    None when the columns are linearly dependent."""
    x, y = np.asarray(rows, dtype=float), np.asarray(ys, dtype=float)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _, rank, _ = np.linalg.lstsq(x / scale, y, rcond=None)
    return None if rank < x.shape[1] else [float(v) for v in coef / scale]


@dataclass(frozen=True)
class PhaseTerms:
    """Fitted fixed costs of one phase (seconds; see the module docstring for the symbols)."""

    layer_s: float = 0.0  # a
    layer_token_s: float = 0.0  # c, per token x hidden unit
    layer_pair_s: float = 0.0  # e, per query token x context token x query width
    layer_kv_s: float = 0.0  # b, per context token x KV byte per token
    step_s: float = 0.0  # s0
    step_token_s: float = 0.0  # s1


@dataclass(frozen=True)
class DeviceCosts:
    """The fixed costs measured on one device ("cpu" or "cuda") for one activation dtype and
    architecture family."""

    device: str
    dtype: str
    architecture: str
    prefill: PhaseTerms
    decode: PhaseTerms
    sample_s_per_vocab: float = 0.0
    linear_s: dict = field(default_factory=dict)  # mode -> phase -> seconds per linear
    #: "float", or "int4": the quantized model as `run` loads it, whose decode terms hold its
    #: linears' calls (quantized_decode)
    weights: str = "float"

    def __getitem__(self, phase: str) -> PhaseTerms:
        return self.prefill if phase == "prefill" else self.decode


def fit_entry(entry: EngineEntry, model: EngineModel) -> DeviceCosts:
    """DeviceCosts from one measured entry of the profile's `engine` section."""
    d, q = model.hidden_size, model.num_heads * model.head_dim
    kv = 2 * model.kv_width * itemsize(entry.dtype)  # K and V bytes per token per layer
    vocab = model.vocab_size
    pre = entry.prefill
    a, c, e = nonnegative_fit([[1.0, p.tokens * d, p.tokens**2 * q] for p in pre], [p.layer_s for p in pre])
    s0, s1 = nonnegative_fit([[1.0, p.tokens] for p in pre], [p.token_s for p in pre])
    dec = entry.decode
    da, db = nonnegative_fit([[1.0, p.context * kv] for p in dec], [p.layer_s for p in dec])
    sample = float(entry.sample_s_per_vocab)
    steps = sorted(p.token_s for p in dec)
    ds0 = max(0.0, steps[len(steps) // 2] - sample * vocab)
    return DeviceCosts(
        device=entry.device,
        dtype=entry.dtype,
        architecture=entry.architecture,
        prefill=PhaseTerms(a, c, e, 0.0, max(0.0, s0 - sample * vocab), s1),
        decode=PhaseTerms(da, 0.0, 0.0, db, ds0, 0.0),
        sample_s_per_vocab=sample,
        linear_s={m: dict(v) for m, v in entry.linear_s.items()},
        weights=entry.weights,
    )


# --- the fixed costs of a profile --------------------------------------------------------------


@dataclass(frozen=True)
class FixedCosts:
    """Every device's fitted fixed costs, and the calibration's factors (device -> phase ->
    factor on every fixed term; 1 without a calibration)."""

    entries: tuple[DeviceCosts, ...] = ()
    scale: dict = field(default_factory=dict)
    calibration: dict | None = None  # who calibrated it: path, created_utc, runs

    def factor(self, device: str, phase: str) -> float:
        return float(self.scale.get(device, {}).get(phase, 1.0))

    def has(self, device: str) -> bool:
        return any(e.device == device for e in self.entries)

    def pick(self, device: str, dtype: str, spec: ModelSpec, weights: str = "float") -> DeviceCosts | None:
        """The entry measured on `device` with `weights` closest to (dtype, `spec`'s family):
        the same dtype and family first, then the same family, then (a MoE model) the same
        dtype and then any llama entry, then the same dtype, then any."""
        on = [e for e in self.entries if e.device == device and e.weights == weights]
        families = family(spec), "llama"
        for ok in (
            *(lambda e, f=f: e.dtype == dtype and e.architecture == f for f in families),
            *(lambda e, f=f: e.architecture == f for f in families),
            lambda e: e.dtype == dtype,
            lambda e: True,
        ):
            found = [e for e in on if ok(e)]
            if found:
                return found[0]
        return None

    def quantized_decode(self, spec: ModelSpec) -> bool:
        """Whether the CPU's decode steps of quantized `spec` are priced from the profile's
        quantized entries of its family: their layer and step terms hold the calls of a step's
        linears (fused where the model takes it), so the linears add their bytes alone, no
        cost per call, and the engine, which calls the same modules, adds nothing per linear
        (docs/plan.md §1d). A mixture-of-experts model takes the `moe` entry, whose terms
        leave out the experts' fused call (the plan prices it from the experts' bytes,
        costmodel.experts.fused_call_s); a profile without one keeps the float terms. False
        for a float model and a profile measured before the quantized entries."""
        return spec.quant is not None and self.measured_quantized(family(spec) if spec.experts else None)

    def measured_quantized(self, family: str | None = None) -> bool:
        """Whether the profile measured the quantized model's path (its int4 entries; of
        `family` when given)."""
        return any(
            e.device == "cpu" and e.weights == QUANT_ENTRY and family in (None, e.architecture)
            for e in self.entries
        )

    def quantized_note(self, spec: ModelSpec) -> str | None:
        """NO_QUANT_NOTE where a profile without int4 entries prices a quantized model, and
        NO_MOE_NOTE where one without the moe entry prices a quantized MoE model."""
        if spec.quant is None or self.quantized_decode(spec):
            return None
        return NO_MOE_NOTE if spec.experts and self.measured_quantized() else NO_QUANT_NOTE

    def linear_s(self, device: str, dtype: str, phase: str, mode: str) -> float:
        """The engine's seconds per linear in `mode` (entries without it: 0), uncalibrated."""
        with_linear = [e for e in self.entries if e.device == device and e.linear_s]
        entry = next((e for e in with_linear if e.dtype == dtype), with_linear[0] if with_linear else None)
        if entry is None:
            return 0.0
        per_mode = entry.linear_s.get(mode) or entry.linear_s.get("split" if mode == "inline" else "") or {}
        return float(per_mode.get(phase, 0.0))

    def to_dict(self) -> dict:
        return {
            "devices": sorted({e.device for e in self.entries}),
            "scale": {k: dict(v) for k, v in self.scale.items()},
            "calibration": self.calibration,
        }


def fixed_costs_from_profile(
    profile: dict | Profile, factors: dict | None = None, calibration: dict | None = None
) -> FixedCosts | None:
    """The fitted fixed costs of a validated profile (None when it has no `engine` section),
    scaled by a calibration's `factors` (device -> phase -> factor; costmodel.calibration);
    `calibration` records who made them (path, created_utc, runs)."""
    engine = profile_sections(profile).engine
    if engine is None:
        return None
    entries = tuple(fit_entry(e, engine.model) for e in engine.entries)
    return FixedCosts(entries, dict(factors or {}), calibration)


# --- applying them ---------------------------------------------------------------------------


def family(spec: ModelSpec) -> str:
    """The engine-cost family that measures `spec`: moe (routed experts), opt, else llama."""
    return "moe" if spec.experts else "opt" if spec.architecture == "opt" else "llama"


def step_context(phase: str, prompt_len: int, max_new_tokens: int) -> float:
    """The context a step attends to: the prompt in prefill, the mean decode context in decode."""
    return float(prompt_len) if phase == "prefill" else prompt_len + max_new_tokens / 2


def layer_s(costs: DeviceCosts, spec: ModelSpec, phase: str, tokens: int, context: float) -> float:
    """Seconds of one decoder layer's non-linear work in a step of `tokens` tokens."""
    t = costs[phase]
    kv = 2 * spec.num_kv_heads * spec.head_dim * itemsize(costs.dtype)
    q = spec.num_heads * spec.head_dim
    return (
        t.layer_s
        + t.layer_token_s * tokens * spec.hidden_size
        + t.layer_pair_s * tokens * context * q
        + t.layer_kv_s * context * kv * (tokens if phase == "decode" else 1)
    )


def outside_s(costs: DeviceCosts, spec: ModelSpec, phase: str, tokens: int, batch: int) -> float:
    """Seconds per step outside the layers and linears: embedding, final norm, masks, the
    generation loop, sampling (one per sequence)."""
    t = costs[phase]
    return t.step_s + t.step_token_s * tokens + costs.sample_s_per_vocab * spec.vocab_size * batch


def fixed_s(
    fixed: FixedCosts,
    device: str,
    dtype: str,
    spec: ModelSpec,
    phase: str,
    *,
    prompt_len: int,
    max_new_tokens: int,
    batch: int,
    layers: int,
    outside: bool = True,
    weights: str = "float",
) -> float | None:
    """Non-linear seconds of `layers` decoder layers (+ the step's work outside them when
    `outside`) on `device`, before any calibration; None when the profile measured no such
    device. `weights`: the entries to use ("int4": the quantized model's)."""
    costs = fixed.pick(device, dtype, spec, weights)
    if costs is None:
        return None
    tokens = batch * (prompt_len if phase == "prefill" else 1)
    ctx = step_context(phase, prompt_len, max_new_tokens)
    t = layers * layer_s(costs, spec, phase, tokens, ctx)
    if outside:
        t += outside_s(costs, spec, phase, tokens, batch)
    return t


def linear_mode(p: LinearPlacement, phase: str) -> str | None:
    """How the engine runs a placement in `phase`: None (resident: a plain device linear),
    "inline" (the CPU computes it whole), "stream" (the GPU computes it whole), else "split"."""
    if p.resident:
        return None
    k = p.cpu_rows(phase)
    return "inline" if k == p.out_features else "stream" if k == 0 else "split"


def linears_s(
    fixed: FixedCosts, device: str, dtype: str, placements: list[LinearPlacement] | tuple, phase: str
) -> float:
    """The engine's own seconds for `placements` in `phase` (its cost per linear and mode),
    before any calibration."""
    counts: dict[str, int] = {}
    for p in placements:
        mode = linear_mode(p, phase)
        if mode is not None:
            counts[mode] = counts.get(mode, 0) + 1
    return sum(n * fixed.linear_s(device, dtype, phase, mode) for mode, n in counts.items())
