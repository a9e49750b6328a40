"""The cost model (pure Python, no torch): hardware rates and the time of one linear's shares
(hardware), rates fitted from a profile (fit), the engine's fixed costs (fixed) and their
calibration from real runs (calibration), every strategy's step (strategies), and one
prediction of one execution (predict). `from hetegen_cli.plan import costmodel as cm` gives
the hardware model's names (cm.Rates, cm.split_times, ...)."""

from hetegen_cli.plan.costmodel.hardware import (
    PhaseRates,
    Rates,
    ShareTimes,
    attention_time,
    balanced_fraction,
    cpu_row_s,
    cpu_time,
    fit_affine,
    gpu_row_s,
    gpu_time,
    pipeline_time,
    split_times,
    transfer_row_s,
    transfer_time,
)

__all__ = [
    "PhaseRates",
    "Rates",
    "ShareTimes",
    "attention_time",
    "balanced_fraction",
    "cpu_row_s",
    "cpu_time",
    "fit_affine",
    "gpu_row_s",
    "gpu_time",
    "pipeline_time",
    "split_times",
    "transfer_row_s",
    "transfer_time",
]
