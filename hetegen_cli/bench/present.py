"""Presenting a bench document (bench.report.finish): Rich tables, CSV rows, a PNG plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hetegen_cli.core.console import table
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.core.units import format_bytes


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
    console.print(
        f"bench {m['name']} ({m['architecture']}, {m['dtype']}, "
        f"{format_bytes(m['weight_bytes'])}): prompt {w['prompt_len']}, "
        f"{w['max_new_tokens']} new tokens, greedy; {doc['method']['warmup_runs']} "
        f"warm-up + {doc['method']['repeat']} runs per arm (mean ± sd)",
        highlight=False,
    )
    if not any(e["status"] == "ok" for s in doc["budgets"] for e in s["arms"]):
        console.print("No arm could run here; the reasons follow.", highlight=False)
    else:
        _tables(doc, console)
    reasons: dict[tuple, list] = {}
    for sk in doc["summary"]["skipped"]:
        label = _budget_label(doc["budgets"][sk["budget_index"]])
        reasons.setdefault((sk["arm"], sk["status"], sk["reason"]), []).append(label)
    for (arm, status, reason), labels in reasons.items():
        console.print(
            f"{status.capitalize()}: {arm} at GPU budget {', '.join(labels)}: {reason}", highlight=False
        )
    for note in doc["summary"]["notes"]:
        console.print(f"Note: {note}", highlight=False)


def _rss_cell(arm: dict) -> str:
    """The host peak RSS, and its anonymous part where measured: "9.49 GiB (anon 6.18 GiB)"."""
    rss, anon = arm.get("host_peak_rss_bytes"), arm.get("host_peak_anon_bytes")
    if rss is None:
        return "-"
    return format_bytes(rss) + (f" (anon {format_bytes(anon)})" if anon is not None else "")


def _tables(doc: dict, console: Any) -> None:
    t = table(
        "Measured",
        (
            "GPU budget",
            "arm",
            "dtype",
            "prefill s",
            "prefill tok/s",
            "decode tok/s",
            "e2e tok/s",
            "TTFT s",
            "GPU peak",
            "host peak RSS",
            "tokens",
        ),
        left=("arm", "dtype", "tokens"),
    )
    for s in doc["budgets"]:
        for e in s["arms"]:
            if e["status"] != "ok":
                continue
            mt = e["metrics"]
            gpu = e.get("gpu_peak_memory_bytes")
            t.add_row(
                _budget_label(s),
                e["arm"],
                e["info"].get("compute_dtype", ""),
                _pm(mt["prefill_s"]),
                _pm(mt["prefill_tokens_per_s"]),
                _pm(mt["decode_tokens_per_s"]),
                _pm(mt["end_to_end_tokens_per_s"]),
                _pm(mt["time_to_first_token_s"]),
                format_bytes(gpu) if gpu is not None else "-",
                _rss_cell(e),
                _tokens_cell(e),
            )
    console.print(t)
    t = table(
        "Compared (x = this arm's tok/s over the other's)",
        (
            "GPU budget",
            "arm",
            "pred decode tok/s",
            "err",
            "own bound",
            "of own",
            "of hybrid",
            "prefill x ref",
            "decode x ref",
            "e2e x ref",
            "decode x offload",
            "e2e x offload",
            "decode x layer-split",
            "e2e x layer-split",
            "decode x experts-on-cpu",
            "decode x llama.cpp",
            "e2e x llama.cpp",
        ),
        left=("arm", "own bound"),
    )
    for s in doc["budgets"]:
        for e in s["arms"]:
            if e["status"] != "ok":
                continue
            pred, err = e.get("prediction") or {}, e.get("prediction_error") or {}
            b, r = e["bound"], e["ratios"]
            t.add_row(
                _budget_label(s),
                e["arm"],
                _num(pred.get("decode_tokens_per_s"), "{:.3g}"),
                _num(err.get("decode_tokens_per_s"), "{:+.0%}"),
                b["own"] or "-",
                _num(b["fraction_of_own_bound"], "{:.0%}"),
                _num(b["fraction_of_hybrid_bound"], "{:.0%}"),
                _num(r["vs_reference"]["prefill_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_reference"]["decode_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_reference"]["end_to_end_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_offload"]["decode_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_offload"]["end_to_end_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_layer_split"]["decode_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_layer_split"]["end_to_end_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_experts_on_cpu"]["decode_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_llama_cpp"]["decode_tokens_per_s"], "{:.2f}x"),
                _num(r["vs_llama_cpp"]["end_to_end_tokens_per_s"], "{:.2f}x"),
            )
    console.print(t)


CSV_FIELDS = (
    "budget_index",
    "gpu_budget_bytes",
    "arm",
    "status",
    "reason",
    "compute_dtype",
    "device",
    "repeat",
    "prefill_s_mean",
    "prefill_s_sd",
    "prefill_tokens_per_s_mean",
    "decode_tokens_per_s_mean",
    "decode_tokens_per_s_sd",
    "end_to_end_tokens_per_s_mean",
    "end_to_end_tokens_per_s_sd",
    "time_to_first_token_s_mean",
    "time_to_first_token_s_sd",
    "gpu_peak_memory_bytes",
    "host_peak_rss_bytes",
    "host_peak_anon_bytes",
    "predicted_decode_tokens_per_s",
    "decode_prediction_error",
    "predicted_end_to_end_tokens_per_s",
    "end_to_end_prediction_error",
    "own_bound",
    "fraction_of_own_bound",
    "fraction_of_hybrid_bound",
    "prefill_vs_reference",
    "decode_vs_reference",
    "end_to_end_vs_reference",
    "decode_vs_offload",
    "end_to_end_vs_offload",
    "decode_vs_layer_split",
    "end_to_end_vs_layer_split",
    "decode_vs_experts_on_cpu",
    "end_to_end_vs_experts_on_cpu",
    "decode_vs_llama_cpp",
    "end_to_end_vs_llama_cpp",
    "tokens_match",
    "first_divergence",
    "compared_with",
    "tokens_verified",
)


def csv_rows(doc: dict) -> list[dict]:
    """One flat row per (budget, arm); missing values are empty strings."""
    rows = []
    for i, s in enumerate(doc["budgets"]):
        for e in s["arms"]:
            row = {
                "budget_index": i,
                "gpu_budget_bytes": s.get("gpu_budget_bytes"),
                "arm": e["arm"],
                "status": e["status"],
                "reason": e.get("reason"),
            }
            if e["status"] == "ok":
                mt, pred = e["metrics"], e.get("prediction") or {}
                err, b, r, c = e.get("prediction_error") or {}, e["bound"], e["ratios"], e["token_check"]
                row.update(
                    compute_dtype=e["info"].get("compute_dtype"),
                    device=e["info"].get("device"),
                    repeat=mt["decode_tokens_per_s"]["n"],
                    gpu_peak_memory_bytes=e.get("gpu_peak_memory_bytes"),
                    host_peak_rss_bytes=e.get("host_peak_rss_bytes"),
                    host_peak_anon_bytes=e.get("host_peak_anon_bytes"),
                    predicted_decode_tokens_per_s=pred.get("decode_tokens_per_s"),
                    decode_prediction_error=err.get("decode_tokens_per_s"),
                    predicted_end_to_end_tokens_per_s=pred.get("end_to_end_tokens_per_s"),
                    end_to_end_prediction_error=err.get("end_to_end_tokens_per_s"),
                    own_bound=b["own"],
                    fraction_of_own_bound=b["fraction_of_own_bound"],
                    fraction_of_hybrid_bound=b["fraction_of_hybrid_bound"],
                    prefill_vs_reference=r["vs_reference"]["prefill_tokens_per_s"],
                    decode_vs_reference=r["vs_reference"]["decode_tokens_per_s"],
                    end_to_end_vs_reference=r["vs_reference"]["end_to_end_tokens_per_s"],
                    decode_vs_offload=r["vs_offload"]["decode_tokens_per_s"],
                    end_to_end_vs_offload=r["vs_offload"]["end_to_end_tokens_per_s"],
                    decode_vs_layer_split=r["vs_layer_split"]["decode_tokens_per_s"],
                    end_to_end_vs_layer_split=r["vs_layer_split"]["end_to_end_tokens_per_s"],
                    decode_vs_experts_on_cpu=r["vs_experts_on_cpu"]["decode_tokens_per_s"],
                    end_to_end_vs_experts_on_cpu=r["vs_experts_on_cpu"]["end_to_end_tokens_per_s"],
                    decode_vs_llama_cpp=r["vs_llama_cpp"]["decode_tokens_per_s"],
                    end_to_end_vs_llama_cpp=r["vs_llama_cpp"]["end_to_end_tokens_per_s"],
                    tokens_match=c["tokens_match"],
                    first_divergence=c["first_divergence"],
                    compared_with=c["compared_with"],
                    tokens_verified=c["verified"],
                )
                for m in (
                    "prefill_s",
                    "decode_tokens_per_s",
                    "end_to_end_tokens_per_s",
                    "time_to_first_token_s",
                    "prefill_tokens_per_s",
                ):
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
    return atomic_write(path, csv_text(doc))


def plot_png(doc: dict) -> bytes:
    """PNG bytes: decode and end-to-end tok/s against the GPU budget, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, 2)
    arms = list(dict.fromkeys(e["arm"] for s in doc["budgets"] for e in s["arms"]))
    for ax, metric, title in (
        (axes[0], "decode_tokens_per_s", "decode"),
        (axes[1], "end_to_end_tokens_per_s", "end-to-end (incl. prefill)"),
    ):
        for arm in arms:
            pts = sorted(
                (s["gpu_budget_bytes"] / 2**30, e["metrics"][metric]["mean"], e["metrics"][metric]["sd"])
                for s in doc["budgets"]
                for e in s["arms"]
                if e["arm"] == arm and e["status"] == "ok" and s["gpu_budget_bytes"] is not None
            )
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker="o",
                    capsize=3,
                    label=arm,
                )
        ax.set_xlabel("GPU memory budget (GiB)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(
        f"hetegen bench: {doc['model']['name']}, prompt {doc['workload']['prompt_len']}, "
        f"{doc['workload']['max_new_tokens']} new tokens"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plot(doc: dict, path: str | Path) -> Path:
    return atomic_write(path, plot_png(doc))
