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

ROW_GRANULARITY = 16  # CPU/GPU split points are multiples of this many rows (or 0 / out)


def round_rows(fraction: float, out_features: int, granularity: int = ROW_GRANULARITY) -> int:
    """Rows for the CPU from a fraction, rounded to `granularity` (0 and out stay exact)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cpu_fraction {fraction} outside [0, 1]")
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
