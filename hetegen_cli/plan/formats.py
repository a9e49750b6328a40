"""The CPU share's number format per phase (docs/plan.md, "CPU formats"; pure Python).

Prefill multiplies many tokens at once (GEMM: compute-bound), decode one token (GEMV:
memory-bound plus a fixed cost per call), and a CPU's fastest format is often not the same for
both: AMX makes bfloat16 GEMM several times faster than float32 while small bfloat16 GEMVs
pay a larger fixed cost; CPUs without native half precision run float16 GEMM far slower than
float32. The planner solves the plan once per (prefill, decode) pair of measured formats and
keeps the fastest pair whose host memory fits. A pair that needs more host memory (a second
copy of the CPU rows) must save more than FORMAT_TOLERANCE of the predicted time; otherwise
the pair with the least host memory among those within the tolerance wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetegen_cli.core.units import format_bytes
from hetegen_cli.plan.sections import FormatChoice

#: a pair that holds more host memory must be this much faster (fraction of the total time)
FORMAT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Tried:
    """One (prefill, decode) format pair and what solving the plan with it gave."""

    pair: tuple[str, str]
    total_s: float | None = None  # predicted seconds for the workload (None: no plan)
    prefill_s: float | None = None
    decode_s_per_token: float | None = None
    host_bytes: int | None = None
    error: str | None = None  # why no plan (e.g. host memory over budget)

    def to_dict(self) -> dict:
        return {
            "prefill": self.pair[0],
            "decode": self.pair[1],
            "total_s": self.total_s,
            "prefill_s": self.prefill_s,
            "decode_s_per_token": self.decode_s_per_token,
            "host_bytes": self.host_bytes,
            "error": self.error,
        }


def candidate_pairs(measured: list[str], forced: tuple[str, str] | None) -> list[tuple[str, str]]:
    """Every (prefill, decode) pair of measured formats, or just the forced one."""
    if forced is not None:
        return [forced]
    return [(p, d) for p in measured for d in measured]


def pick(tried: list[Tried], forced: bool) -> tuple[Tried, FormatChoice]:
    """The chosen pair among those with a plan, and the record the plan keeps of the choice.
    `tried` must hold at least one pair with a plan."""
    ok = [t for t in tried if t.error is None]
    fastest = min(ok, key=lambda t: t.total_s)
    near = [t for t in ok if t.total_s <= fastest.total_s * (1 + FORMAT_TOLERANCE)]
    chosen = min(near, key=lambda t: (t.host_bytes, len(set(t.pair)), t.total_s))
    record = FormatChoice(
        prefill=chosen.pair[0],
        decode=chosen.pair[1],
        forced=forced,
        tolerance=FORMAT_TOLERANCE,
        reason=_reason(chosen, fastest, tried, forced),
        considered=[t.to_dict() for t in tried],
    )
    return chosen, record


def _name(pair: tuple[str, str]) -> str:
    return pair[0] if pair[0] == pair[1] else f"{pair[0]} prefill + {pair[1]} decode"


def _reason(chosen: Tried, fastest: Tried, tried: list[Tried], forced: bool) -> str:
    if forced:
        return f"{_name(chosen.pair)}: forced by --cpu-dtype"
    text = f"{_name(chosen.pair)}: predicted {chosen.total_s:.3g} s for the workload"
    singles = [t for t in tried if t.error is None and len(set(t.pair)) == 1 and t is not chosen]
    if len(set(chosen.pair)) == 2 and singles:
        best_single = min(singles, key=lambda t: t.total_s)
        saved = 1 - chosen.total_s / best_single.total_s
        text += (
            f", {saved:.0%} less than the best single format ({best_single.pair[0]}, "
            f"{best_single.total_s:.3g} s) for {format_bytes(chosen.host_bytes - best_single.host_bytes)} "
            "more host memory"
        )
    elif fastest is not chosen:
        saved = 1 - fastest.total_s / chosen.total_s
        text += (
            f"; {_name(fastest.pair)} would save {saved:.1%} (under {FORMAT_TOLERANCE:.0%}) for "
            f"{format_bytes(fastest.host_bytes - chosen.host_bytes)} more host memory"
        )
    else:
        text += ", the fastest measured pair"
    refused = [t for t in tried if t.error is not None]
    if refused:
        text += f"; {len(refused)} pair(s) did not fit (cpu_formats.considered says why)"
    return text
