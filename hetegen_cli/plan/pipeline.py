"""The whole-pipeline split: per-linear fractions chosen for the step, not each linear alone
(pure Python, docs/plan.md §2b).

`costmodel.balanced_fraction` balances every split linear on its own: its CPU share takes as
long as its copy plus its GPU share. With prefetch (staging buffers > 1) the copy of linear m
runs while earlier linears compute, so the GPU path of m costs less than its copy, and the
per-linear balance leaves the copy stream idle at times: it undervalues prefetch.
`refine_rows` searches the family of splits that balance every linear against a scaled GPU
path, f_m(λ) = balanced fraction with the GPU path's per-row and per-call costs times λ
(λ = 1 is the per-linear solver's answer), and keeps the λ whose whole step is fastest in
`costmodel.pipeline_time`, the same pipeline model that predicts the plan. Each phase is
searched on its own. Because λ = 1 is always a candidate, the result is never predicted slower
than the per-linear split (tested); shares never grow past the staging buffer the memory plan
sized.
"""

from __future__ import annotations

from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.costmodel.strategies import tokens_for
from hetegen_cli.plan.document import LinearPlacement, round_rows

#: the GPU-path scale factors tried first, then refined around the best
LAMBDAS = (0.35, 0.5, 0.65, 0.8, 0.9, 1.0, 1.15, 1.35)
REFINE_STEPS = (0.06, 0.03)


def _fraction(rates: cm.Rates, out: int, inp: int, tokens: int, lam: float) -> float:
    """balanced_fraction with the GPU path's costs times `lam`."""
    c = cm.cpu_row_s(rates, inp, tokens, True)
    g = lam * (cm.transfer_row_s(rates, inp, True) + cm.gpu_row_s(rates, inp, tokens))
    o_p = lam * (rates.pcie_copy_s + rates.gpu_call_s)
    f = (o_p - rates.cpu_call_s + out * g) / (out * (c + g))
    return min(1.0, max(0.0, f))


def refine_rows(
    placements: tuple[LinearPlacement, ...],
    rates_of: list[cm.Rates],
    tokens_of: list[int],
    buffers: int,
    phase: str,
    min_rows: list[int],
) -> tuple[list[int], float, float]:
    """(rows per placement for `phase`, the step's pipeline seconds with them, with the given
    rows). `rates_of[i]`/`tokens_of[i]`: placement i's rates and tokens in this phase;
    `min_rows[i]`: the fewest CPU rows that keep its streamed share within the staging buffer."""
    given = [p.cpu_rows(phase) for p in placements]
    share_cache: dict[tuple, tuple[float, float, float]] = {}
    keys = [
        (p.out_features, p.in_features, tokens_of[i], id(rates_of[i]), p.resident)
        for i, p in enumerate(placements)
    ]

    def step(i: int, rows: int) -> tuple[float, float, float]:
        key = (*keys[i], rows)
        hit = share_cache.get(key)
        if hit is None:
            p = placements[i]
            t = cm.split_times(
                rates_of[i], p.out_features, p.in_features, rows, tokens_of[i], resident=p.resident
            )
            hit = share_cache[key] = (t.cpu_s, t.transfer_s, t.gpu_s)
        return hit

    def total(rows: list[int]) -> float:
        return cm.pipeline_time([step(i, r) for i, r in enumerate(rows)], buffers, engines)

    engines = rates_of[0].h2d_copy_engines if rates_of else 1
    base = total(given)
    if buffers < 2 or not any(not p.resident for p in placements) or not rates_of or not rates_of[0].has_gpu:
        return given, base, base
    frac_cache: dict[tuple, int] = {}

    def rows_for(lam: float) -> list[int]:
        rows = []
        for i, p in enumerate(placements):
            if p.resident:
                rows.append(0)
                continue
            key = (*keys[i], lam)
            k = frac_cache.get(key)
            if k is None:
                f = _fraction(rates_of[i], p.out_features, p.in_features, tokens_of[i], lam)
                k = frac_cache[key] = round_rows(f, p.out_features)
            rows.append(max(k, min_rows[i]))
        return rows

    best_rows, best_t, best_lam = given, base, 1.0
    tried: dict[float, float] = {}

    def consider(lam: float) -> None:
        nonlocal best_rows, best_t, best_lam
        lam = round(lam, 4)
        if lam <= 0 or lam in tried:
            return
        rows = rows_for(lam)
        t = total(rows)
        tried[lam] = t
        if t < best_t * (1 - 1e-9):
            best_rows, best_t, best_lam = rows, t, lam

    for lam in LAMBDAS:
        consider(lam)
    for step_size in REFINE_STEPS:
        centre = best_lam
        consider(centre - step_size)
        consider(centre + step_size)
    return best_rows, best_t, base


def min_cpu_rows(p: LinearPlacement, stage_elems: int) -> int:
    """The fewest CPU rows (a multiple of 16, or out) whose streamed share fits `stage_elems`
    elements of staging buffer."""
    if p.resident:
        return 0
    fit = stage_elems // p.in_features if p.in_features else p.out_features
    need = max(0, p.out_features - fit)
    if need == 0:
        return 0
    rows = -(-need // 16) * 16
    return min(rows, p.out_features)


def refine_placements(
    spec, rates: cm.PhaseRates, req, placements: tuple[LinearPlacement, ...], buffers: int, stage_bytes: int
) -> tuple[LinearPlacement, ...]:
    """`placements` with each phase's CPU rows chosen for the whole pipeline (refine_rows);
    shares stay within `stage_bytes`, the staging buffer the memory plan sized."""
    quant = spec.quant_map()
    by_name = {lin.name: lin for lin in (*spec.linears, spec.lm_head)}
    row_bytes = [max(1, by_name[p.name].weight_bytes // max(1, p.out_features)) for p in placements]
    min_rows = [
        0 if p.resident else min_cpu_rows(p, stage_bytes * p.in_features // row_bytes[i])
        for i, p in enumerate(placements)
    ]
    rows = {}
    for phase in ("prefill", "decode"):
        rates_of = [rates.of_linear(phase, quant.get(p.name, (None,))[0]) for p in placements]
        tokens_of = [tokens_for(p.role, req, phase) for p in placements]
        rows[phase], _, _ = refine_rows(placements, rates_of, tokens_of, buffers, phase, min_rows)
    return tuple(
        p if p.resident else LinearPlacement.of(p, False, rows["prefill"][i], rows["decode"][i])
        for i, p in enumerate(placements)
    )
