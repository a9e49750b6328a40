"""Predictions of one execution as it really ran, and their check against the measurement
(pure Python; docs/run.md "Predicted and measured", docs/bench.md).

`predict_execution` predicts a model's step for a run's own workload (its prompt length and
generated tokens) on the backend it ran on: plain or all-CPU (`cpu`), a plan on a GPU
(`cuda`), or a GPU plan on the CPU stand-in (`standin`: the "GPU" share is computed on the CPU
too, `standin_rates`). `prediction_check` puts the prediction beside the measured times, per
phase, with the parts `plan --calibrate` needs.
"""

from __future__ import annotations

from dataclasses import replace

from hetegen_cli.models.spec import ModelSpec
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from hetegen_cli.plan.overheads import Overheads, with_fixed_terms
from hetegen_cli.plan.predictions import cpu_only_prediction, figures, step_times
from hetegen_cli.plan.rates import phase_rates_from_profile, rates_from_profile
from hetegen_cli.plan.request import PlanRequest

#: On the stand-in, the CPU share and the "GPU" share (and its "copy") run one after the other
#: on the same thread and cores. Modelled as both sides at half the CPU at once: for a balanced
#: split the pipeline's max(cpu, copy + gpu) then equals their sum at the full rate.
STANDIN_SHARE = 0.5
BACKENDS = ("cpu", "cuda", "standin")


def standin_rates(
    profile: dict,
    weights_dtype: str,
    cpu_dtypes: tuple[str, str],
    prefill_tokens: int,
    quant_format: tuple[str, int] | None = None,
):
    """(PhaseRates, notes) of the CPU stand-in: the CPU share at the CPU's rates in its formats
    (a quantized model's: `quant_format`, as phase_rates_from_profile), the "GPU" share at the
    CPU's rates in the weights dtype, the "copy" a memory copy (read and write: half the memory
    read rate); both sides at STANDIN_SHARE while they run together."""
    rates, notes = phase_rates_from_profile(profile, weights_dtype, cpu_dtypes, prefill_tokens, quant_format)
    gpu_side, more = rates_from_profile(profile, weights_dtype, weights_dtype, prefill_tokens)
    notes += more

    def standin(r: cm.Rates) -> cm.Rates:
        copy = r.dram_bytes_per_s / 2
        return replace(
            r,
            has_gpu=True,
            cpu_bytes_per_s_concurrent=r.cpu_bytes_per_s * STANDIN_SHARE,
            pcie_bytes_per_s=copy,
            pcie_bytes_per_s_concurrent=copy * STANDIN_SHARE,
            pcie_copy_s=0.0,
            gpu_call_s=gpu_side.cpu_call_s,
            gpu_bytes_per_s=gpu_side.cpu_bytes_per_s * STANDIN_SHARE,
            gpu_flops_per_s=gpu_side.cpu_flops_per_s * STANDIN_SHARE,
        )

    return cm.PhaseRates(standin(rates.prefill), standin(rates.decode), rates.quant), notes


def predict_execution(
    spec: ModelSpec,
    placements: tuple[LinearPlacement, ...] | None,
    runtime: RuntimeSettings | None,
    rates: cm.PhaseRates,
    overheads: Overheads | None,
    req: PlanRequest,
    backend: str,
) -> dict:
    """Figures of `spec` run with `placements` (None: the stock model
    on the CPU) on `backend` ("cpu", "cuda" or "standin"), for `req`'s workload. Figures as
    predictions.figures, with `linear` and `fixed` parts when `overheads` is known."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    all_cpu = backend == "cpu" or placements is None or runtime is None or not runtime.requires_gpu
    if all_cpu:
        base = cpu_only_prediction(rates, spec, req)
        placements = placements or ()
    else:
        buffers = 1 if backend == "standin" else max(1, runtime.staging_buffers)
        out = {
            phase: step_times(rates, spec, req, placements, phase, buffers, runtime.lm_head_on_gpu)[1]
            for phase in ("prefill", "decode")
        }
        base = figures(req, out["prefill"], out["decode"], 0)
    device = "cuda" if backend == "cuda" else "cpu"
    fig, _ = with_fixed_terms(
        {"hetegen": dict(base)}, overheads, spec, req, placements, rates, all_cpu=all_cpu, gpu_device=device
    )
    return fig["hetegen"]


def prediction_check(
    predicted: dict,
    measured_prefill_s: float | None,
    measured_decode_s: float | None,
    *,
    device: str,
    strategy: str,
    profile: dict | None,
) -> dict:
    """Predicted beside measured, per phase (decode: seconds per step), with ratio =
    measured / predicted and the parts `plan --calibrate` refits."""
    fixed = predicted.get("fixed") or {}
    raw = fixed.get("uncalibrated") or fixed
    phases = {}
    for phase, key, measured in (
        ("prefill", "prefill_s", measured_prefill_s),
        ("decode", "decode_s_per_token", measured_decode_s),
    ):
        pred = predicted.get(key)
        entry = {
            "predicted_s": pred,
            "measured_s": measured,
            "ratio": measured / pred if measured and pred else None,
        }
        if "linear" in predicted:
            entry.update(
                linear_s=predicted["linear"][key],
                fixed_s=predicted["fixed"][key],
                fixed_uncalibrated_s=raw[key],
            )
        phases[phase] = entry
    pred_rate = predicted.get("decode_tokens_per_s")
    meas_rate = 1.0 / measured_decode_s if measured_decode_s else None
    return {
        "strategy": strategy,
        "device": device,
        "calibrated": bool((predicted.get("fixed") or {}).get("calibrated")),
        "profile": profile,
        "phases": phases,
        "decode_tokens_per_s": {
            "predicted": pred_rate,
            "measured": meas_rate,
            "error": meas_rate / pred_rate - 1 if meas_rate and pred_rate else None,
        },
    }
