"""The engine's fixed costs in the cost model: what a step pays besides its linears (pure Python).

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
KV-cache append (transformers' DynamicCache copies the whole cache every step) and the
attention's reads. These terms replace the attention term of the bandwidth model on the same
device, so nothing is counted twice. A calibration (plan.calibration) scales them per device
and phase from real runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from hetegen_cli.core.dtypes import itemsize
from hetegen_cli.core.phase import PHASES
from hetegen_cli.models.spec import ModelSpec
from hetegen_cli.plan.costmodel import PhaseRates
from hetegen_cli.plan.document import LinearPlacement
from hetegen_cli.plan.predictions import attention_for, figures
from hetegen_cli.plan.request import PlanRequest

MODES = ("inline", "split", "stream")
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

    def __getitem__(self, phase: str) -> PhaseTerms:
        return self.prefill if phase == "prefill" else self.decode


def fit_entry(entry: dict, model: dict) -> DeviceCosts:
    """DeviceCosts from one measured entry of the profile's `engine` section."""
    d, q = model["hidden_size"], model["num_heads"] * model["head_dim"]
    kv = 2 * model["kv_width"] * itemsize(entry["dtype"])  # K and V bytes per token per layer
    vocab = model["vocab_size"]
    pre = entry["prefill"]
    a, c, e = nonnegative_fit(
        [[1.0, p["tokens"] * d, p["tokens"] ** 2 * q] for p in pre], [p["layer_s"] for p in pre]
    )
    s0, s1 = nonnegative_fit([[1.0, p["tokens"]] for p in pre], [p["token_s"] for p in pre])
    dec = entry["decode"]
    da, db = nonnegative_fit([[1.0, p["context"] * kv] for p in dec], [p["layer_s"] for p in dec])
    sample = float(entry.get("sample_s_per_vocab") or 0.0)
    steps = sorted(p["token_s"] for p in dec)
    ds0 = max(0.0, steps[len(steps) // 2] - sample * vocab)
    return DeviceCosts(
        device=entry["device"],
        dtype=entry["dtype"],
        architecture=entry["architecture"],
        prefill=PhaseTerms(a, c, e, 0.0, max(0.0, s0 - sample * vocab), s1),
        decode=PhaseTerms(da, 0.0, 0.0, db, ds0, 0.0),
        sample_s_per_vocab=sample,
        linear_s={m: dict(v) for m, v in (entry.get("linear_s") or {}).items()},
    )


# --- the overheads of a profile --------------------------------------------------------------


@dataclass(frozen=True)
class Overheads:
    """Every device's fitted fixed costs, and the calibration's factors (device -> phase ->
    factor on every fixed term; 1 without a calibration)."""

    entries: tuple[DeviceCosts, ...] = ()
    scale: dict = field(default_factory=dict)
    calibration: dict | None = None  # who calibrated it: path, created_utc, runs

    def factor(self, device: str, phase: str) -> float:
        return float((self.scale.get(device) or {}).get(phase, 1.0))

    def has(self, device: str) -> bool:
        return any(e.device == device for e in self.entries)

    def pick(self, device: str, dtype: str, architecture: str) -> DeviceCosts | None:
        """The entry measured on `device` closest to (dtype, architecture): the same dtype and
        family first, then the same family, then the same dtype, then any."""
        family = "opt" if architecture == "opt" else "llama"
        on = [e for e in self.entries if e.device == device]
        for ok in (
            lambda e: e.dtype == dtype and e.architecture == family,
            lambda e: e.architecture == family,
            lambda e: e.dtype == dtype,
            lambda e: True,
        ):
            found = [e for e in on if ok(e)]
            if found:
                return found[0]
        return None

    def linear_s(self, device: str, dtype: str, phase: str, mode: str) -> float:
        """The engine's seconds per linear in `mode` (entries without it: 0)."""
        with_linear = [e for e in self.entries if e.device == device and e.linear_s]
        entry = next((e for e in with_linear if e.dtype == dtype), with_linear[0] if with_linear else None)
        if entry is None:
            return 0.0
        per_mode = entry.linear_s.get(mode) or entry.linear_s.get("split" if mode == "inline" else "") or {}
        return float(per_mode.get(phase, 0.0)) * self.factor(device, phase)

    def to_dict(self) -> dict:
        return {
            "devices": sorted({e.device for e in self.entries}),
            "scale": {k: dict(v) for k, v in self.scale.items()},
            "calibration": self.calibration,
        }


def overheads_from_profile(profile: dict, calibration: dict | None = None) -> Overheads | None:
    """The fitted fixed costs of a validated profile (None when it has no `engine` section),
    scaled by a calibration document's factors (plan.calibration) when given."""
    engine = profile.get("engine")
    if not engine:
        return None
    entries = tuple(fit_entry(e, engine["model"]) for e in engine["entries"])
    scale = (calibration or {}).get("factors") or {}
    who = None
    if calibration:
        who = {k: calibration.get(k) for k in ("path", "created_utc")} | {
            "runs": len({r.get("source") for r in calibration.get("runs", [])})
        }
    return Overheads(entries, scale, who)


# --- applying them ---------------------------------------------------------------------------


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
    overheads: Overheads,
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
) -> float | None:
    """Non-linear seconds of `layers` decoder layers (+ the step's work outside them when
    `outside`) on `device`, calibrated; None when the profile measured no such device."""
    costs = overheads.pick(device, dtype, spec.architecture)
    if costs is None:
        return None
    tokens = batch * (prompt_len if phase == "prefill" else 1)
    ctx = step_context(phase, prompt_len, max_new_tokens)
    t = layers * layer_s(costs, spec, phase, tokens, ctx)
    if outside:
        t += outside_s(costs, spec, phase, tokens, batch)
    return t * overheads.factor(device, phase)


def linear_mode(p: LinearPlacement, phase: str) -> str | None:
    """How the engine runs a placement in `phase`: None (resident: a plain device linear),
    "inline" (the CPU computes it whole), "stream" (the GPU computes it whole), else "split"."""
    if p.resident:
        return None
    k = p.cpu_rows(phase)
    return "inline" if k == p.out_features else "stream" if k == 0 else "split"


def linears_s(
    overheads: Overheads, device: str, dtype: str, placements: list[LinearPlacement] | tuple, phase: str
) -> float:
    """The engine's own seconds for `placements` in `phase` (its cost per linear and mode)."""
    counts: dict[str, int] = {}
    for p in placements:
        mode = linear_mode(p, phase)
        if mode is not None:
            counts[mode] = counts.get(mode, 0) + 1
    return sum(n * overheads.linear_s(device, dtype, phase, mode) for mode, n in counts.items())


# --- every strategy's prediction, with the fixed terms ----------------------------------------


def with_fixed_terms(
    predictions: dict,
    overheads: Overheads | None,
    spec: ModelSpec,
    req: PlanRequest,
    placements: tuple[LinearPlacement, ...],
    rates: PhaseRates,
    *,
    all_cpu: bool,
    gpu_device: str = "cuda",
) -> tuple[dict, list[str]]:
    """`predictions` (strategy -> figures) with the fixed terms added to every strategy, so the
    comparison stays fair; each gains `fixed` (seconds per phase, what they hold) and
    `linear` (the bandwidth model's part). The attention term of the bandwidth model is
    replaced by the measured non-linear work on the same device. `gpu_device`: where the
    "GPU" side runs ("cpu" on the CPU stand-in). Returns (predictions, notes)."""
    if overheads is None:
        return predictions, []
    notes: list[str] = []
    # the activations are in the model's dtype on either side (norms, attention, KV cache)
    gpu_dtype = cpu_dtype = spec.dtype
    if not all_cpu and not overheads.has(gpu_device):
        notes.append(
            "the profile has no engine costs measured on the GPU: GPU-side predictions leave out "
            "the non-linear work and the engine's cost per linear; re-run `hetegen profile` on this machine"
        )
    args = dict(prompt_len=req.prompt_len, max_new_tokens=req.max_new_tokens, batch=req.batch_size)
    L = spec.num_layers
    out = dict(predictions)
    for key, fig in predictions.items():
        if not fig:
            continue
        added, linear = {}, {}
        for phase in PHASES:
            base = fig["prefill_s"] if phase == "prefill" else fig["decode_s_per_token"]
            r = rates[phase]
            if key in ("cpu_only",) or all_cpu:
                parts = [("cpu", cpu_dtype, L, False)]
                lins = linears_s(overheads, "cpu", cpu_dtype, placements, phase) if key == "hetegen" else 0.0
            elif key == "layer_split":
                g = fig.get("gpu_layers") or 0
                parts = [(gpu_device, gpu_dtype, g, True), ("cpu", cpu_dtype, L - g, False)]
                lins = 0.0
            else:
                stream = key == "offload"
                parts = [(gpu_device, gpu_dtype, L, True)]
                lins = linears_s(
                    overheads,
                    gpu_device,
                    gpu_dtype,
                    [_streamed(p) for p in placements] if stream else placements,
                    phase,
                )
            extra, replaced = lins, 0.0
            for i, (device, dtype, layers, on_gpu) in enumerate(parts):
                t = fixed_s(overheads, device, dtype, spec, phase, layers=layers, outside=i == 0, **args)
                if t is None:
                    continue
                extra += t
                replaced += attention_for(r, spec, req, phase, layers, on_gpu)
            added[phase] = extra - replaced
            linear[phase] = base - replaced
        new = figures(
            req,
            fig["prefill_s"] + added["prefill"],
            fig["decode_s_per_token"] + added["decode"],
            fig["gpu_memory_bytes"],
        )
        extras = {k: v for k, v in fig.items() if k not in new}
        new.update(extras)
        new["linear"] = {"prefill_s": linear["prefill"], "decode_s_per_token": linear["decode"]}
        new["fixed"] = {
            "prefill_s": new["prefill_s"] - linear["prefill"],
            "decode_s_per_token": new["decode_s_per_token"] - linear["decode"],
            "calibrated": bool(overheads.scale),
        }
        out[key] = new
    if overheads.scale:  # what plan --calibrate refits: the fixed parts before any calibration
        raw, _ = with_fixed_terms(
            predictions,
            replace(overheads, scale={}),
            spec,
            req,
            placements,
            rates,
            all_cpu=all_cpu,
            gpu_device=gpu_device,
        )
        for key, fig in out.items():
            if fig and raw.get(key):
                fig["fixed"]["uncalibrated"] = {
                    k: raw[key]["fixed"][k] for k in ("prefill_s", "decode_s_per_token")
                }
    return out, notes


def _streamed(p: LinearPlacement) -> LinearPlacement:
    if p.resident:
        return p
    return LinearPlacement(p.name, p.layer_index, p.role, p.out_features, p.in_features, False, 0, 0)
