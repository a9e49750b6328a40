"""The time model of one linear's CPU share, PCIe transfer and GPU share (pure, no torch).

Every cost is affine in the rows of a share (method.md sections 4-6):

    T_cpu(r)      = cpu_call_s  + r * in * max(cpu_dtype_bytes / B_cpu, 2 n / F_cpu)
    T_transfer(r) = pcie_copy_s + r * in * weight_bytes / B_pcie
    T_gpu(r)      = gpu_call_s  + r * in * max(weight_bytes / B_hbm, 2 n / F_gpu)

(each 0 when r == 0), n = tokens in the step. The balanced split solves
T_cpu(f out) = T_transfer((1-f) out) + T_gpu((1-f) out) in closed form (`balanced_fraction`).
`Rates` holds the fitted constants; `rates_from_profile` fits them from a profile document.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from hetegen_cli.model_spec import DTYPE_BYTES


@dataclass(frozen=True)
class Rates:
    """Fitted hardware constants. Rates in bytes/s or FLOP/s, overheads in seconds per call.

    `*_concurrent` rates are those measured with CPU GEMV and PCIe copies running together
    (they share DRAM); split linears use them, strategies that use one path alone do not.
    """

    weights_dtype: str = "float16"
    cpu_dtype: str = "float32"
    cpu_threads: int = 1
    cpu_call_s: float = 0.0                  # fixed cost of one CPU GEMV/GEMM call
    cpu_bytes_per_s: float = 50e9            # B_cpu: weight bytes (cpu dtype) read per second
    cpu_bytes_per_s_concurrent: float = 50e9
    cpu_flops_per_s: float = 1e12            # F_cpu at prefill shapes
    dram_bytes_per_s: float = 60e9           # B_dram: measured memory read bandwidth
    has_gpu: bool = True
    pcie_bytes_per_s: float = 25e9           # B_pcie: pinned host->GPU copies
    pcie_bytes_per_s_concurrent: float = 25e9
    pcie_copy_s: float = 0.0                 # fixed cost of one copy
    gpu_call_s: float = 0.0                  # fixed cost of one GPU matmul (launch)
    gpu_bytes_per_s: float = 1e12            # B_hbm: GEMV weight-read rate
    gpu_flops_per_s: float = 100e12          # F_gpu at prefill shapes

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weights_dtype]

    @property
    def cpu_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.cpu_dtype]

    @property
    def cpu_params_per_s(self) -> float:
        return self.cpu_bytes_per_s / self.cpu_dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Rates":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- per-row costs (seconds per output row of a share) -------------------------------------

def cpu_row_s(rates: Rates, in_features: int, tokens: int, concurrent: bool = True) -> float:
    """CPU seconds per output row: bandwidth- or compute-bound, whichever is slower."""
    bw = rates.cpu_bytes_per_s_concurrent if concurrent else rates.cpu_bytes_per_s
    return in_features * max(rates.cpu_dtype_bytes / bw, 2.0 * tokens / rates.cpu_flops_per_s)


def transfer_row_s(rates: Rates, in_features: int, concurrent: bool = True) -> float:
    bw = rates.pcie_bytes_per_s_concurrent if concurrent else rates.pcie_bytes_per_s
    return in_features * rates.weight_bytes / bw


def gpu_row_s(rates: Rates, in_features: int, tokens: int) -> float:
    return in_features * max(rates.weight_bytes / rates.gpu_bytes_per_s,
                             2.0 * tokens / rates.gpu_flops_per_s)


# --- share times ---------------------------------------------------------------------------

def cpu_time(rates: Rates, rows: int, in_features: int, tokens: int, concurrent: bool = True) -> float:
    """Seconds for the CPU to compute `rows` output rows for `tokens` tokens."""
    if rows <= 0:
        return 0.0
    return rates.cpu_call_s + rows * cpu_row_s(rates, in_features, tokens, concurrent)


def transfer_time(rates: Rates, rows: int, in_features: int, concurrent: bool = True) -> float:
    """Seconds to copy `rows` weight rows host->GPU."""
    if rows <= 0:
        return 0.0
    return rates.pcie_copy_s + rows * transfer_row_s(rates, in_features, concurrent)


def gpu_time(rates: Rates, rows: int, in_features: int, tokens: int) -> float:
    """Seconds for the GPU to multiply `rows` output rows (weights already on the GPU)."""
    if rows <= 0:
        return 0.0
    return rates.gpu_call_s + rows * gpu_row_s(rates, in_features, tokens)


@dataclass(frozen=True)
class ShareTimes:
    """Predicted seconds of one linear in one phase. layer_s = max(cpu_s, transfer_s + gpu_s)."""

    cpu_s: float
    transfer_s: float
    gpu_s: float

    @property
    def layer_s(self) -> float:
        return max(self.cpu_s, self.transfer_s + self.gpu_s)

    def to_dict(self) -> dict:
        return {"cpu_s": self.cpu_s, "transfer_s": self.transfer_s, "gpu_s": self.gpu_s,
                "layer_s": self.layer_s}


def split_times(rates: Rates, out_features: int, in_features: int, cpu_rows: int, tokens: int,
                *, resident: bool = False, concurrent: bool = True) -> ShareTimes:
    """Times of a linear with `cpu_rows` on the CPU and the rest streamed (or resident)."""
    if resident:
        return ShareTimes(0.0, 0.0, gpu_time(rates, out_features, in_features, tokens))
    gpu_rows = out_features - cpu_rows
    both = concurrent and 0 < cpu_rows < out_features
    return ShareTimes(
        cpu_time(rates, cpu_rows, in_features, tokens, both),
        transfer_time(rates, gpu_rows, in_features, both),
        gpu_time(rates, gpu_rows, in_features, tokens),
    )


def balanced_fraction(rates: Rates, out_features: int, in_features: int, tokens: int) -> float:
    """cpu_fraction in [0, 1] with T_cpu == T_transfer + T_gpu (before row rounding).

    Closed form on the affine model: o_c + f*out*c = o_p + (1-f)*out*g, with c, g the
    per-row CPU and GPU-path costs and o_c, o_p their per-call overheads.
    Without a GPU the answer is 1.
    """
    if not rates.has_gpu:
        return 1.0
    c = cpu_row_s(rates, in_features, tokens, True)
    g = transfer_row_s(rates, in_features, True) + gpu_row_s(rates, in_features, tokens)
    o_c = rates.cpu_call_s
    o_p = rates.pcie_copy_s + rates.gpu_call_s
    fraction = (o_p - o_c + out_features * g) / (out_features * (c + g))
    return min(1.0, max(0.0, fraction))


def pipeline_time(steps: list[tuple[float, float, float]], buffers: int) -> float:
    """Seconds for linears run in order, each (cpu_s, transfer_s, gpu_s) (method.md section 9).

    Linear m's CPU share and GPU math need its input x (the end of linear m-1); its weight copy
    does not. The engine issues the copy for linear m when linear m - (buffers - 1) starts
    (prefetch depth = buffers - 1) on one copy stream, into `buffers` rotating staging buffers
    (a buffer is refilled once the kernel that read it finished). With one buffer nothing runs
    ahead and each linear takes max(cpu_s, transfer_s + gpu_s).
    """
    depth = max(0, buffers - 1)
    copy_end = layer_end = 0.0
    starts: list[float] = []        # start (input ready) of every linear
    kernel_ends: list[float] = []   # GPU end times of streamed linears, in order
    for m, (cpu_s, transfer_s, gpu_s) in enumerate(steps):
        x = layer_end
        starts.append(x)
        gpu_start = x
        if transfer_s > 0:
            issue = starts[m - depth] if m >= depth else 0.0
            free = kernel_ends[-buffers] if len(kernel_ends) >= buffers else 0.0
            copy_end = max(copy_end, free, issue) + transfer_s
            gpu_start = max(x, copy_end)
        gpu_end = gpu_start + gpu_s
        if transfer_s > 0:
            kernel_ends.append(gpu_end)
        layer_end = max(x + cpu_s, gpu_end)
    return layer_end


# --- attention and other per-step GPU work (not linears) -----------------------------------

def attention_time(rates: Rates, *, num_layers: int, num_heads: int, head_dim: int,
                   kv_bytes: int, query_tokens: int, context_tokens: int, batch: int,
                   on_gpu: bool) -> float:
    """Seconds of attention math for one step over `num_layers` layers.

    max(QK^T + PV FLOPs = 4 b L q c h d / F, KV bytes read / B) on the chosen side, where
    `kv_bytes` is the K and V held for those layers at `context_tokens`.
    """
    flops = 4.0 * batch * num_layers * query_tokens * context_tokens * num_heads * head_dim
    if on_gpu:
        return max(flops / rates.gpu_flops_per_s, kv_bytes / rates.gpu_bytes_per_s)
    return max(flops / rates.cpu_flops_per_s, kv_bytes / rates.dram_bytes_per_s)


# --- fitting helpers used by profile_fields -----------------------------------------------

def fit_affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares t = a + x / rate over (x, t) points; returns (a >= 0, rate > 0).

    One point, or a fit with a negative intercept or slope, falls back to a line through the
    origin and the largest x (the asymptotic rate).
    """
    pts = [(float(x), float(t)) for x, t in points if x > 0 and t > 0]
    if not pts:
        raise ValueError("no positive measurements to fit")
    largest = max(pts)
    if len(pts) >= 2:
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        mt = sum(t for _, t in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx > 0:
            slope = sum((x - mx) * (t - mt) for x, t in pts) / sxx
            a = mt - slope * mx
            if slope > 0 and a >= 0:
                return a, 1.0 / slope
    return 0.0, largest[0] / largest[1]


# --- reading a profile document (profile_doc.SCHEMA) ---------------------------------------

def _mean_s(entry: dict) -> float:
    return float(entry["seconds"]["mean"])


def _nearest_flops(entries: list[dict], tokens: int) -> float | None:
    """FLOP/s of the GEMM measurement with the token count nearest `tokens` (log scale),
    the fastest shape among equals."""
    if not entries:
        return None
    key = lambda m: (abs(math.log(m["tokens"] / max(tokens, 1))), -m["flops_per_s"])  # noqa: E731
    return float(min(entries, key=key)["flops_per_s"])


def _of_dtype(entries: list[dict], dtype: str, notes: list[str], what: str) -> list[dict]:
    """Entries of `dtype`, else of the first measured dtype (with a note)."""
    chosen = [m for m in entries if m["dtype"] == dtype]
    if chosen or not entries:
        return chosen
    other = entries[0]["dtype"]
    notes.append(f"{what} not measured for {dtype}; used the {other} measurements")
    return [m for m in entries if m["dtype"] == other]


def _profile_error(message: str, hint: str = "re-run `hetegen profile`"):
    from hetegen_cli.errors import ProfileError

    return ProfileError(message, hint)


def rates_from_profile(profile: dict, weights_dtype: str, cpu_dtype: str | None = None,
                       prefill_tokens: int = 512) -> tuple[Rates, list[str]]:
    """Fit `Rates` from a validated profile document; returns them with notes on fallbacks.

    CPU: GEMV t = call + weight_bytes / B_cpu, least squares over the measured shapes of
    `cpu_dtype` (default cpu.best_gemv_dtype, the fastest in params/s); F_cpu from the GEMM
    measurement nearest `prefill_tokens`; B_dram = cpu.memory_read_bytes_per_s. PCIe: B_pcie
    from the largest pinned H2D copy, the per-copy overhead from the smallest. GPU: GEMM FLOP/s
    of `weights_dtype`, GEMV fit for B_hbm and the launch cost. Concurrent rates scale the solo
    ones by gpu.concurrent's together/alone ratios.
    """
    notes: list[str] = []
    cpu = profile["cpu"]
    measured = sorted({m["dtype"] for m in cpu["gemv"]})
    cpu_dtype = cpu_dtype or cpu["best_gemv_dtype"]
    gemv = [m for m in cpu["gemv"] if m["dtype"] == cpu_dtype]
    if not gemv:
        raise _profile_error(f"the profile has no CPU GEMV measurements for {cpu_dtype}",
                             f"pass --cpu-dtype {' or '.join(measured)}, or re-run `hetegen profile`")
    threads = int(cpu["threads"])
    gemv = [m for m in gemv if m["threads"] == threads] or gemv
    cpu_call_s, cpu_bw = fit_affine([(m["weight_bytes"], _mean_s(m)) for m in gemv])
    cpu_flops = _nearest_flops(_of_dtype(cpu["gemm"], cpu_dtype, notes, "CPU GEMM"), prefill_tokens)
    if cpu_flops is None:
        raise _profile_error("the profile has no CPU GEMM measurements")
    dram = float(cpu["memory_read_bytes_per_s"]["mean"])
    base = dict(weights_dtype=weights_dtype, cpu_dtype=cpu_dtype, cpu_threads=threads,
                cpu_call_s=cpu_call_s, cpu_bytes_per_s=cpu_bw, cpu_flops_per_s=cpu_flops,
                dram_bytes_per_s=dram)
    gpu = profile.get("gpu")
    if not gpu:
        return Rates(has_gpu=False, cpu_bytes_per_s_concurrent=cpu_bw, **base), notes
    h2d = sorted((t for t in gpu["transfers"] if t["direction"] == "h2d" and t["memory"] == "pinned"),
                 key=lambda t: t["size_bytes"])
    if not h2d:
        raise _profile_error("the profile has no pinned host-to-GPU copy timings")
    pcie_bw = h2d[-1]["size_bytes"] / _mean_s(h2d[-1])
    pcie_copy_s = max(0.0, _mean_s(h2d[0]) - h2d[0]["size_bytes"] / pcie_bw) if len(h2d) > 1 else 0.0
    gpu_flops = _nearest_flops(_of_dtype(gpu["gemm"], weights_dtype, notes, "GPU GEMM"),
                               prefill_tokens)
    ggemv = _of_dtype(gpu["gemv"], weights_dtype, notes, "GPU GEMV")
    if gpu_flops is None or not ggemv:
        raise _profile_error("the profile lacks GPU GEMM or GEMV measurements")
    gpu_call_s, hbm = fit_affine([(m["weight_bytes"], _mean_s(m)) for m in ggemv])
    conc = gpu["concurrent"]
    cpu_ratio = min(1.0, conc["cpu_gemv_weight_bytes_per_s"] / conc["cpu_gemv_alone_weight_bytes_per_s"])
    pcie_ratio = min(1.0, conc["h2d_bytes_per_s"] / conc["h2d_alone_bytes_per_s"])
    both = cpu_bw * cpu_ratio + pcie_bw * pcie_ratio
    if both > dram:  # CPU loads and DMA reads share DRAM: never more than B_dram together
        notes.append(f"concurrent CPU + PCIe rates ({both / 1e9:.1f} GB/s) exceed the measured "
                     f"memory bandwidth ({dram / 1e9:.1f} GB/s); both scaled down to fit")
        cpu_ratio, pcie_ratio = cpu_ratio * dram / both, pcie_ratio * dram / both
    return Rates(has_gpu=True, cpu_bytes_per_s_concurrent=cpu_bw * cpu_ratio,
                 pcie_bytes_per_s=pcie_bw, pcie_bytes_per_s_concurrent=pcie_bw * pcie_ratio,
                 pcie_copy_s=pcie_copy_s, gpu_call_s=gpu_call_s, gpu_bytes_per_s=hbm,
                 gpu_flops_per_s=gpu_flops, **base), notes


def profile_identity(profile: dict, path: str | None, sha256: str | None) -> dict:
    """The plan's `profile` section."""
    gpu = profile.get("gpu") or {}
    return {"path": path, "created_utc": profile.get("created_utc"),
            "cpu_model": (profile.get("host") or {}).get("cpu_model"),
            "gpu_name": gpu.get("name"), "quick": profile.get("quick"), "sha256": sha256}


def profile_available_ram(profile: dict) -> int | None:
    """Host RAM available when the profile was taken, in bytes."""
    value = (profile.get("host") or {}).get("ram_available_bytes")
    return int(value) if value else None


def profile_gpu_memory(profile: dict) -> tuple[int | None, int | None]:
    """(free, total) GPU memory in bytes when the profile was taken; (None, None) without a GPU."""
    gpu = profile.get("gpu")
    if not gpu:
        return None, None
    return int(gpu["free_memory_bytes"]), int(gpu["total_memory_bytes"])
