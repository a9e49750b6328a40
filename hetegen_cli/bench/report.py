"""Figures and comparisons of `hetegen bench` (pure Python).

`finish(doc)` turns raw per-run timings into mean/sd summaries and adds, per arm: the
planner's prediction and its relative error, the fraction of the physical bound (docs/method.md
§11) reached, the greedy-token check against a reference arm, and the ratios to the
`offload` and `layer-split` arms. bench.present renders it (tables, CSV, plot).
"""

from __future__ import annotations

from statistics import median
from typing import TYPE_CHECKING, Any

from hetegen_cli.bench.tokens import token_baseline, token_check
from hetegen_cli.core.stats import ratio, summarize
from hetegen_cli.plan.costmodel.predict import prediction_check
from hetegen_cli.plan.sections import Figures, ProfileIdentity

if TYPE_CHECKING:
    from hetegen_cli.bench.prepare import BudgetCase

#: arm -> key of plan.predictions
PREDICTION_KEYS = {
    "hetegen": "hetegen",
    "offload": "offload",
    "layer-split": "layer_split",
    "cpu": "cpu_only",
    "reference": "cpu_only",
}
METRICS = (
    "prefill_s",
    "prefill_tokens_per_s",
    "time_to_first_token_s",
    "decode_tokens_per_s",
    "end_to_end_tokens_per_s",
    "total_s",
)


# --- per budget --------------------------------------------------------------------------


def budget_section(case: BudgetCase, entries: list[dict], spec: Any) -> dict:
    return {
        "gpu_budget_bytes": case.gpu_budget_bytes,
        "requested_gpu_budget_bytes": case.requested_gpu_budget_bytes,
        "plan": case.plan.summary() if case.plan else None,
        "plan_error": case.plan_error,
        **(
            {
                "experts_on_cpu_plan": case.moe_plan.summary() if case.moe_plan else None,
                "experts_on_cpu_plan_error": case.moe_plan_error,
            }
            if spec.experts
            else {}
        ),
        "model_weight_bytes": spec.total_weight_bytes,
        "arms": entries,
    }


def metrics(samples: list[dict]) -> dict:
    """Summaries (stats.summarize) of every metric over the timed runs."""
    rows = [
        dict(s, end_to_end_tokens_per_s=(s["generated_tokens"] / s["total_s"] if s["total_s"] > 0 else 0.0))
        for s in samples
    ]
    return {m: summarize([r[m] for r in rows]) for m in METRICS}


def _mean(entry: dict, metric: str) -> float | None:
    if entry.get("status") != "ok":
        return None
    return entry["metrics"][metric]["mean"]


def _rel_error(measured: float | None, predicted: float | None) -> float | None:
    r = ratio(measured, predicted)
    return None if r is None else r - 1.0


def prediction(
    arm: str, entry: dict, plan: dict | None, cpu_plan: dict | None = None
) -> tuple[dict | None, dict | None]:
    """(the planner's figures for this arm, relative errors measured/predicted - 1): the arm's
    own prediction as it ran (`predicted`, bench.predicted) when there is one; else the plan's.
    The `cpu` and `reference` arms are predicted by the all-CPU plan (`cpu_plan`, a
    Plan.summary)."""
    own = entry["predicted"]["figures"] if entry.get("predicted") else None
    if own:
        return own, _errors(entry, own)
    if arm in ("cpu", "reference"):
        plan = cpu_plan
    if plan is None or arm not in PREDICTION_KEYS:
        return None, None
    runtime = plan["runtime"]
    formats = (runtime["cpu_dtype_prefill"], runtime["cpu_dtype_decode"])
    if arm == "reference" and formats != (runtime["weights_dtype"],) * 2:
        return None, None  # the CPU-only prediction is for the CPU formats, not the weights dtype
    pred = plan["predictions"].get(PREDICTION_KEYS[arm])
    if not pred:
        return None, None
    return pred, _errors(entry, pred)


def _errors(entry: dict, pred: dict) -> dict:
    return {
        m: _rel_error(_mean(entry, m), pred.get(m))
        for m in ("prefill_s", "decode_tokens_per_s", "end_to_end_tokens_per_s")
    }


def check(entry: dict) -> dict | None:
    """Per-phase predicted against measured (medians of the timed runs; decode per step), with
    the parts `hetegen calibrate` refits (costmodel.predict.prediction_check)."""
    own = entry.get("predicted")
    if not own or entry.get("status") != "ok":
        return None
    samples = entry["samples"]
    prefill = median([s["prefill_s"] for s in samples])
    steps = [s["decode_s"] / s["decode_steps"] for s in samples if s.get("decode_steps")]
    return prediction_check(
        Figures.model_validate(own["figures"]),
        prefill,
        median(steps) if steps else None,
        device=own["device"],
        strategy=own["strategy"],
        profile=ProfileIdentity.model_validate(own["profile"]) if own.get("profile") else None,
    )


def own_bound_s(arm: str, bounds: dict, weight_bytes: int) -> tuple[str | None, float | None]:
    """(name, seconds per decode token) of the arm's own strategy bound (docs/method.md §11)."""
    w = (bounds.get("w_gpu_bytes") or 0) + (bounds.get("w_host_bytes") or 0)
    key = {
        "hetegen": "hybrid",
        "offload": "offload",
        "accelerate": "offload",
        "layer-split": "layer_split",
    }.get(arm)
    if arm == "hetegen" and "hybrid_s_per_token" not in bounds:
        key = "cpu_only"
    if key:
        return key, bounds.get(f"{key}_s_per_token")
    if arm in ("cpu", "reference"):
        if "cpu_only_s_per_token" in bounds:
            return "cpu_only", bounds["cpu_only_s_per_token"]
        rate = min(bounds.get("b_cpu_bytes_per_s") or 0, bounds.get("b_dram_bytes_per_s") or 0)
        return "cpu_only", w / rate if rate else None
    if arm == "gpu" and bounds.get("b_hbm_bytes_per_s"):
        return "gpu", weight_bytes / bounds["b_hbm_bytes_per_s"]
    return None, None


#: arms that compute with kernels of their own: their tokens are compared, but a divergence
#: does not void their timing
OWN_KERNEL_ARMS = ("llama.cpp",)
#: arms whose tokens do not depend on the GPU budget: one measured at any budget is a token
#: baseline for every budget (the `gpu` arm may only fit the larger budgets of a sweep)
BUDGET_FREE_ARMS = ("reference", "gpu", "llama.cpp")


def derive(section: dict, shared: dict | None = None, cpu_plan: dict | None = None) -> None:
    """Add metrics, predictions, bounds, token checks and ratios to one budget section.
    `shared`: budget-free arms measured at other budgets, for the token check; `cpu_plan`:
    the all-CPU plan's summary, which predicts the `cpu` and `reference` arms."""
    entries = {e["arm"]: e for e in section["arms"]}
    plan = section.get("plan")
    bounds = plan["bounds"] if plan else {}
    for e in entries.values():
        if e.get("status") == "ok" and "metrics" not in e:
            e["metrics"] = metrics(e["samples"])
    for arm, e in entries.items():
        if e.get("status") != "ok":
            continue
        e["prediction"], e["prediction_error"] = prediction(arm, e, plan, cpu_plan)
        e["prediction_check"] = check(e)
        name, own = own_bound_s(arm, bounds, section.get("model_weight_bytes") or 0)
        decode = e["metrics"]["decode_tokens_per_s"]["mean"]
        hybrid = bounds.get("hybrid_s_per_token", bounds.get("bound_s_per_token"))
        e["bound"] = {
            "own": name,
            "own_s_per_token": own,
            "fraction_of_own_bound": own * decode if own and decode else None,
            "hybrid_s_per_token": hybrid,
            "hybrid_is": "hybrid" if "hybrid_s_per_token" in bounds else "cpu_only",
            "fraction_of_hybrid_bound": hybrid * decode if hybrid and decode else None,
        }
        candidates = {**(shared or {}), **{a: x for a, x in entries.items() if x.get("status") == "ok"}}
        base = token_baseline(arm, {**candidates, arm: e})
        e["token_check"] = token_check(e, candidates.get(base), base)
        e["ratios"] = {}
        for other in ("reference", "offload", "layer-split", "experts-on-cpu", "llama.cpp"):
            o = entries.get(other) or (shared.get(other) if shared else None) or {}
            e["ratios"][f"vs_{other.replace('-', '_').replace('.', '_')}"] = {
                m: ratio(_mean(e, m), _mean(o, m)) if o else None
                for m in ("prefill_tokens_per_s", "decode_tokens_per_s", "end_to_end_tokens_per_s")
            }


def finish(doc: dict) -> dict:
    """Derive every budget section; add the summary (skips, token problems, notes)."""
    notes, skipped = [], []
    shared: dict = {}
    for section in doc["budgets"]:
        for e in section["arms"]:
            if e["arm"] in BUDGET_FREE_ARMS and e.get("status") == "ok":
                shared.setdefault(e["arm"], e)
    for i, section in enumerate(doc["budgets"]):
        derive(section, shared, doc.get("cpu_plan"))
        for e in section["arms"]:
            if e["status"] != "ok":
                skipped.append(
                    {"budget_index": i, "arm": e["arm"], "status": e["status"], "reason": e["reason"]}
                )
            elif e["token_check"]["tokens_match"] is False:
                c = e["token_check"]
                where = (
                    f"arm {e['arm']} (budget #{i}): greedy tokens differ from "
                    f"{c['compared_with']} from position {c['first_divergence']}"
                )
                if c["verified"]:
                    notes.append(
                        f"{where}, where the top two logits are a near tie (within "
                        f"{c['tolerance']:g} in {e['info'].get('compute_dtype')}): "
                        "rounding, not an error"
                    )
                elif e["arm"] in OWN_KERNEL_ARMS:
                    notes.append(
                        f"{where}: llama.cpp computes with its own kernels (8-bit activations for "
                        "quantized matmuls), so its tokens are not expected to match; its timing counts"
                    )
                elif c["verified"] is False:
                    notes.append(f"{where}, not a near tie: its timing does not count")
                else:
                    notes.append(f"{where} (no logits recorded to judge it)")
    for section in doc["budgets"]:
        plan = section.get("plan")
        for text in (plan["warnings"] + plan["notes"]) if plan else []:
            if f"plan: {text}" not in notes:
                notes.append(f"plan: {text}")
    gpu_skips = sorted({s["arm"] for s in skipped if "no CUDA GPU" in (s["reason"] or "")})
    if gpu_skips:
        notes.insert(
            0, f"GPU arms not measured: {', '.join(gpu_skips)} skipped (no CUDA GPU on this machine)"
        )
    if not doc["provenance"]["has_cuda"] and any(
        e["arm"] == "hetegen" and e["status"] == "ok" for s in doc["budgets"] for e in s["arms"]
    ):
        notes.append(
            "hetegen ran on the CPU stand-in backend (no CUDA): it measures the engine "
            "and its overhead against `reference`, not a CPU+GPU split"
        )
    doc["summary"] = {"skipped": skipped, "notes": notes}
    return doc
