"""Figures, comparisons and output of `hetegen bench` (pure Python except the plot).

`finish(doc)` turns raw per-run timings into mean/sd summaries and adds, per arm: the
planner's prediction and its relative error, the fraction of the physical bound (method.md
section 11) reached, the greedy-token check against a reference arm, and the ratios to the
`offload` and `layer-split` arms. `render(doc)`, `write_csv(doc, path)` and
`write_plot(doc, path)` present it.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from hetegen_cli.bench_tokens import token_baseline, token_check
from hetegen_cli.stats import ratio, summarize
from hetegen_cli.units import format_bytes

#: arm -> key of plan.predictions
PREDICTION_KEYS = {"hetegen": "hetegen", "offload": "offload", "layer-split": "layer_split",
                   "cpu": "cpu_only", "reference": "cpu_only"}
METRICS = ("prefill_s", "prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s",
           "end_to_end_tokens_per_s", "total_s")


# --- per budget --------------------------------------------------------------------------

def plan_summary(plan: Any) -> dict | None:
    """The parts of a plan a benchmark reader needs (None when the planner refused)."""
    if plan is None:
        return None
    from hetegen_cli.plan import runtime_to_dict

    split = [p for p in plan.placements if not p.resident]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    ls = (plan.predictions or {}).get("layer_split") or {}
    return {"budget": plan.budget, "gpu_memory_bytes": plan.memory.get("gpu", {}).get("total_bytes"),
            "host_memory_bytes": plan.memory.get("host", {}).get("total_bytes"),
            "runtime": runtime_to_dict(plan.runtime), "resident_count": plan.resident_count,
            "split_count": len(split),
            "mean_cpu_fraction_prefill": mean([p.cpu_fraction_prefill for p in split]),
            "mean_cpu_fraction_decode": mean([p.cpu_fraction_decode for p in split]),
            "layer_split_gpu_layers": ls.get("gpu_layers"),
            "predictions": plan.predictions, "bounds": plan.bounds,
            "warnings": list(plan.warnings), "notes": list(plan.notes)}


def budget_section(case: Any, entries: list[dict], spec: Any) -> dict:
    return {"gpu_budget_bytes": case.budget_bytes, "requested_gpu_budget_bytes": case.requested_bytes,
            "plan": plan_summary(case.plan), "plan_error": case.plan_error,
            "model_weight_bytes": spec.total_weight_bytes, "arms": entries}


def metrics(samples: list[dict]) -> dict:
    """Summaries (stats.summarize) of every metric over the timed runs."""
    rows = [dict(s, end_to_end_tokens_per_s=(s["generated_tokens"] / s["total_s"]
                                             if s["total_s"] > 0 else 0.0)) for s in samples]
    return {m: summarize([r[m] for r in rows]) for m in METRICS}


def _mean(entry: dict, metric: str) -> float | None:
    if entry.get("status") != "ok":
        return None
    return entry["metrics"][metric]["mean"]


def _rel_error(measured: float | None, predicted: float | None) -> float | None:
    r = ratio(measured, predicted)
    return None if r is None else r - 1.0


def prediction(arm: str, entry: dict, plan: dict | None) -> tuple[dict | None, dict | None]:
    """(the planner's figures for this arm, relative errors measured/predicted - 1)."""
    if plan is None or arm not in PREDICTION_KEYS:
        return None, None
    runtime = plan["runtime"]
    if arm == "reference" and runtime["cpu_dtype"] != runtime["weights_dtype"]:
        return None, None  # the CPU-only prediction is for the CPU dtype
    pred = (plan["predictions"] or {}).get(PREDICTION_KEYS[arm])
    if not pred:
        return None, None
    errors = {m: _rel_error(_mean(entry, m), pred.get(m))
              for m in ("prefill_s", "decode_tokens_per_s", "end_to_end_tokens_per_s")}
    return pred, errors


def own_bound_s(arm: str, bounds: dict, weight_bytes: int) -> tuple[str | None, float | None]:
    """(name, seconds per decode token) of the arm's own strategy bound (method.md 11)."""
    w = (bounds.get("w_gpu_bytes") or 0) + (bounds.get("w_host_bytes") or 0)
    key = {"hetegen": "hybrid", "offload": "offload", "accelerate": "offload",
           "layer-split": "layer_split"}.get(arm)
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


def derive(section: dict) -> None:
    """Add metrics, predictions, bounds, token checks and ratios to one budget section."""
    entries = {e["arm"]: e for e in section["arms"]}
    plan = section.get("plan")
    bounds = (plan or {}).get("bounds") or {}
    for arm, e in entries.items():
        if e.get("status") == "ok" and "metrics" not in e:
            e["metrics"] = metrics(e["samples"])
    for arm, e in entries.items():
        if e.get("status") != "ok":
            continue
        e["prediction"], e["prediction_error"] = prediction(arm, e, plan)
        name, own = own_bound_s(arm, bounds, section.get("model_weight_bytes") or 0)
        decode = e["metrics"]["decode_tokens_per_s"]["mean"]
        hybrid = bounds.get("hybrid_s_per_token", bounds.get("bound_s_per_token"))
        e["bound"] = {"own": name, "own_s_per_token": own,
                      "fraction_of_own_bound": own * decode if own and decode else None,
                      "hybrid_s_per_token": hybrid,
                      "hybrid_is": "hybrid" if "hybrid_s_per_token" in bounds else "cpu_only",
                      "fraction_of_hybrid_bound": hybrid * decode if hybrid and decode else None}
        base = token_baseline(arm, entries)
        e["token_check"] = token_check(e, entries.get(base), base)
        e["ratios"] = {}
        for other in ("offload", "layer-split"):
            o = entries.get(other, {})
            e["ratios"][f"vs_{other.replace('-', '_')}"] = {
                m: ratio(_mean(e, m), _mean(o, m)) if o else None
                for m in ("decode_tokens_per_s", "end_to_end_tokens_per_s")}


def finish(doc: dict) -> dict:
    """Derive every budget section; add the summary (skips, token problems, notes)."""
    notes, skipped = [], []
    for i, section in enumerate(doc["budgets"]):
        derive(section)
        for e in section["arms"]:
            if e["status"] != "ok":
                skipped.append({"budget_index": i, "arm": e["arm"], "status": e["status"],
                                "reason": e["reason"]})
            elif e["token_check"]["tokens_match"] is False:
                c = e["token_check"]
                where = (f"arm {e['arm']} (budget #{i}): greedy tokens differ from "
                         f"{c['compared_with']} from position {c['first_divergence']}")
                if c["verified"]:
                    notes.append(f"{where}, where the top two logits are a near tie (within "
                                 f"{c['tolerance']:g} in {e['info'].get('compute_dtype')}): "
                                 "rounding, not an error")
                elif c["verified"] is False:
                    notes.append(f"{where}, not a near tie: its timing does not count")
                else:
                    notes.append(f"{where} (no logits recorded to judge it)")
    for section in doc["budgets"]:
        for text in (section.get("plan") or {}).get("warnings", []) + \
                ((section.get("plan") or {}).get("notes", [])):
            if f"plan: {text}" not in notes:
                notes.append(f"plan: {text}")
    gpu_skips = sorted({s["arm"] for s in skipped if "no CUDA GPU" in (s["reason"] or "")})
    if gpu_skips:
        notes.insert(0, f"GPU arms not measured: {', '.join(gpu_skips)} skipped (no CUDA GPU on "
                        "this machine)")
    if not doc["provenance"]["has_cuda"] and any(
            e["arm"] == "hetegen" and e["status"] == "ok" for s in doc["budgets"] for e in s["arms"]):
        notes.append("hetegen ran on the CPU stand-in backend (no CUDA): it measures the engine "
                     "and its overhead against `reference`, not a CPU+GPU split")
    doc["summary"] = {"skipped": skipped, "notes": notes}
    return doc


# --- presentation ------------------------------------------------------------------------

def _pm(summary: dict | None, fmt: str = "{:.3g}") -> str:
    if not summary:
        return "-"
    return f"{fmt.format(summary['mean'])} ± {fmt.format(summary['sd'])}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _budget_label(section: dict) -> str:
    b = section.get("gpu_budget_bytes")
    return "-" if b is None else format_bytes(b)


def _tokens_cell(e: dict) -> str:
    c = e.get("token_check") or {}
    if c.get("compared_with") is None:
        return "baseline"
    if c["tokens_match"]:
        return f"= {c['compared_with']}"
    tag = {True: "tie", False: "DIFF", None: "diff?"}[c["verified"]]
    return f"{tag}@{c['first_divergence']} vs {c['compared_with']}"


def render(doc: dict, console: Any) -> None:
    """Two Rich tables (measured; compared), skipped arms and notes, on `console` (at least
    160 columns wide: this is data, a pipe may wrap it)."""
    from rich.console import Console

    console = Console(file=console.file, width=max(console.width, 160), soft_wrap=False)
    m, w = doc["model"], doc["workload"]
    console.print(f"bench {m['name']} ({m['architecture']}, {m['dtype']}, "
                  f"{format_bytes(m['weight_bytes'])}): prompt {w['prompt_len']}, "
                  f"{w['max_new_tokens']} new tokens, greedy; {doc['method']['warmup_runs']} "
                  f"warm-up + {doc['method']['repeat']} runs per arm (mean ± sd)", highlight=False)
    if not any(e["status"] == "ok" for s in doc["budgets"] for e in s["arms"]):
        console.print("No arm could run here; the reasons follow.", highlight=False)
    else:
        _tables(doc, console)
    reasons: dict[tuple, list] = {}
    for sk in doc["summary"]["skipped"]:
        label = _budget_label(doc["budgets"][sk["budget_index"]])
        reasons.setdefault((sk["arm"], sk["status"], sk["reason"]), []).append(label)
    for (arm, status, reason), labels in reasons.items():
        console.print(f"{status.capitalize()}: {arm} at GPU budget {', '.join(labels)}: {reason}",
                      highlight=False)
    for note in doc["summary"]["notes"]:
        console.print(f"Note: {note}", highlight=False)


def _tables(doc: dict, console: Any) -> None:
    from rich.table import Table

    t = Table(title="Measured", title_justify="left")
    for col in ("GPU budget", "arm", "dtype", "prefill s", "decode tok/s", "e2e tok/s",
                "TTFT s", "GPU peak", "host peak RSS", "tokens"):
        t.add_column(col, justify="left" if col in ("arm", "dtype", "tokens") else "right")
    for s in doc["budgets"]:
        for e in s["arms"]:
            if e["status"] != "ok":
                continue
            mt = e["metrics"]
            gpu = e.get("gpu_peak_memory_bytes")
            t.add_row(_budget_label(s), e["arm"], e["info"].get("compute_dtype", ""),
                      _pm(mt["prefill_s"]), _pm(mt["decode_tokens_per_s"]),
                      _pm(mt["end_to_end_tokens_per_s"]), _pm(mt["time_to_first_token_s"]),
                      format_bytes(gpu) if gpu is not None else "-",
                      format_bytes(e["host_peak_rss_bytes"]), _tokens_cell(e))
    console.print(t)
    t = Table(title="Compared (x = this arm's tok/s over the other's)", title_justify="left")
    for col in ("GPU budget", "arm", "pred decode tok/s", "err", "own bound", "of own",
                "of hybrid", "decode x offload", "e2e x offload", "decode x layer-split",
                "e2e x layer-split"):
        t.add_column(col, justify="left" if col in ("arm", "own bound") else "right")
    for s in doc["budgets"]:
        for e in s["arms"]:
            if e["status"] != "ok":
                continue
            pred, err = e.get("prediction") or {}, e.get("prediction_error") or {}
            b, r = e["bound"], e["ratios"]
            t.add_row(_budget_label(s), e["arm"], _num(pred.get("decode_tokens_per_s"), "{:.3g}"),
                      _num(err.get("decode_tokens_per_s"), "{:+.0%}"), b["own"] or "-",
                      _num(b["fraction_of_own_bound"], "{:.0%}"),
                      _num(b["fraction_of_hybrid_bound"], "{:.0%}"),
                      _num(r["vs_offload"]["decode_tokens_per_s"], "{:.2f}x"),
                      _num(r["vs_offload"]["end_to_end_tokens_per_s"], "{:.2f}x"),
                      _num(r["vs_layer_split"]["decode_tokens_per_s"], "{:.2f}x"),
                      _num(r["vs_layer_split"]["end_to_end_tokens_per_s"], "{:.2f}x"))
    console.print(t)


CSV_FIELDS = ("budget_index", "gpu_budget_bytes", "arm", "status", "reason", "compute_dtype",
              "device", "repeat", "prefill_s_mean", "prefill_s_sd", "prefill_tokens_per_s_mean",
              "decode_tokens_per_s_mean", "decode_tokens_per_s_sd", "end_to_end_tokens_per_s_mean",
              "end_to_end_tokens_per_s_sd", "time_to_first_token_s_mean",
              "time_to_first_token_s_sd", "gpu_peak_memory_bytes", "host_peak_rss_bytes",
              "predicted_decode_tokens_per_s", "decode_prediction_error",
              "predicted_end_to_end_tokens_per_s", "end_to_end_prediction_error", "own_bound",
              "fraction_of_own_bound", "fraction_of_hybrid_bound", "decode_vs_offload",
              "end_to_end_vs_offload", "decode_vs_layer_split", "end_to_end_vs_layer_split",
              "tokens_match", "first_divergence", "compared_with", "tokens_verified")


def csv_rows(doc: dict) -> list[dict]:
    """One flat row per (budget, arm); missing values are empty strings."""
    rows = []
    for i, s in enumerate(doc["budgets"]):
        for e in s["arms"]:
            row = {"budget_index": i, "gpu_budget_bytes": s.get("gpu_budget_bytes"),
                   "arm": e["arm"], "status": e["status"], "reason": e.get("reason")}
            if e["status"] == "ok":
                mt, pred = e["metrics"], e.get("prediction") or {}
                err, b, r, c = e.get("prediction_error") or {}, e["bound"], e["ratios"], e["token_check"]
                row.update(compute_dtype=e["info"].get("compute_dtype"), device=e["info"].get("device"),
                           repeat=mt["decode_tokens_per_s"]["n"],
                           gpu_peak_memory_bytes=e.get("gpu_peak_memory_bytes"),
                           host_peak_rss_bytes=e.get("host_peak_rss_bytes"),
                           predicted_decode_tokens_per_s=pred.get("decode_tokens_per_s"),
                           decode_prediction_error=err.get("decode_tokens_per_s"),
                           predicted_end_to_end_tokens_per_s=pred.get("end_to_end_tokens_per_s"),
                           end_to_end_prediction_error=err.get("end_to_end_tokens_per_s"),
                           own_bound=b["own"], fraction_of_own_bound=b["fraction_of_own_bound"],
                           fraction_of_hybrid_bound=b["fraction_of_hybrid_bound"],
                           decode_vs_offload=r["vs_offload"]["decode_tokens_per_s"],
                           end_to_end_vs_offload=r["vs_offload"]["end_to_end_tokens_per_s"],
                           decode_vs_layer_split=r["vs_layer_split"]["decode_tokens_per_s"],
                           end_to_end_vs_layer_split=r["vs_layer_split"]["end_to_end_tokens_per_s"],
                           tokens_match=c["tokens_match"], first_divergence=c["first_divergence"],
                           compared_with=c["compared_with"], tokens_verified=c["verified"])
                for m in ("prefill_s", "decode_tokens_per_s", "end_to_end_tokens_per_s",
                          "time_to_first_token_s", "prefill_tokens_per_s"):
                    row[f"{m}_mean"] = mt[m]["mean"]
                    if f"{m}_sd" in CSV_FIELDS:
                        row[f"{m}_sd"] = mt[m]["sd"]
            rows.append({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})
    return rows


def csv_text(doc: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(doc))
    return buf.getvalue()


def write_csv(doc: dict, path: str | Path) -> Path:
    from hetegen_cli.jsonio import atomic_write_text

    return atomic_write_text(path, csv_text(doc))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to a temporary file beside `path`, then rename it into place."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_png(doc: dict) -> bytes:
    """PNG bytes: decode and end-to-end tok/s against the GPU budget, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, 2)
    arms = list(dict.fromkeys(e["arm"] for s in doc["budgets"] for e in s["arms"]))
    for ax, metric, title in ((axes[0], "decode_tokens_per_s", "decode"),
                              (axes[1], "end_to_end_tokens_per_s", "end-to-end (incl. prefill)")):
        for arm in arms:
            pts = sorted((s["gpu_budget_bytes"] / 2**30, e["metrics"][metric]["mean"],
                          e["metrics"][metric]["sd"])
                         for s in doc["budgets"] for e in s["arms"]
                         if e["arm"] == arm and e["status"] == "ok" and s["gpu_budget_bytes"] is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            marker="o", capsize=3, label=arm)
        ax.set_xlabel("GPU memory budget (GiB)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"hetegen bench: {doc['model']['name']}, prompt {doc['workload']['prompt_len']}, "
                 f"{doc['workload']['max_new_tokens']} new tokens")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plot(doc: dict, path: str | Path) -> Path:
    return atomic_write_bytes(path, plot_png(doc))
