"""What the user asks the planner for: the workload and the budgets (pure, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import UsageError
from hetegen_cli.plan.expert_stats import ExpertStats

GiB = 1024**3
#: GPU memory held back for the CUDA context, kernels and allocator fragmentation
#: (Accelerate's docs advise leaving 1-2 GB); --reserve changes it.
DEFAULT_RESERVE_BYTES = 1 * GiB
OBJECTIVES = ("pipeline", "per-linear")


def cpu_dtype_pair(text: str | None) -> tuple[str, str] | None:
    """--cpu-dtype as (prefill, decode): "D" for both phases or "P,D"; None stays None
    (the planner chooses). UsageError for anything else."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or any(p not in WEIGHT_DTYPES for p in parts):
        raise UsageError(
            f"unknown --cpu-dtype {text!r}",
            f"use one of {', '.join(WEIGHT_DTYPES)}, or PREFILL,DECODE (e.g. bfloat16,float32)",
        )
    return parts[0], parts[-1]


@dataclass(frozen=True)
class PlanRequest:
    """The workload and budgets. Sizes in bytes; None = take it from the profile.

    Validated once, on construction (InputError naming the option); the context against a
    model is checked by `ModelSpec.check_context`.
    """

    prompt_len: int = 512
    max_new_tokens: int = 64
    batch_size: int = 1
    gpu_budget_bytes: int | None = None
    cpu_budget_bytes: int | None = None
    cpu_dtype: str | None = None  # None: chosen per phase; "D" both phases; "P,D" prefill, decode
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    staging_buffers: int = 2
    model_arg: str = ""
    #: "pipeline": per-linear fractions chosen for the whole step (plan.pipeline); "per-linear":
    #: each split linear balanced alone (costmodel.balanced_fraction), the fallback
    objective: str = "pipeline"
    #: mixture-of-experts models (llama.cpp's flags): every routed expert on the CPU, or those
    #: of the first `n_cpu_moe` decoder layers; the others by time saved per byte
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    #: split each chosen CPU-side expert between the CPU and the GPU in decode where it pays
    #: (plan.experts.split_in_decode); False: the CPU computes its experts whole
    expert_split: bool = True
    #: measured expert use (`plan --expert-use FILE`, plan.expert_use): each expert's own chance
    #: of being chosen per token, for its place and in every prediction; None: uniform use
    expert_use: ExpertStats | None = None

    def __post_init__(self) -> None:
        for value, flag in (
            (self.prompt_len, "--prompt-len"),
            (self.max_new_tokens, "--max-new-tokens"),
            (self.batch_size, "--batch-size"),
            (self.staging_buffers, "staging buffers"),
        ):
            if value < 1:
                raise UsageError(f"{flag} is {value}; it must be at least 1", f"pass {flag} 1 or more")
            if value > 2**24:
                raise UsageError(f"{flag} is {value}; it must be at most {2**24}", f"pass a smaller {flag}")
        cpu_dtype_pair(self.cpu_dtype)
        if not 0 <= self.n_cpu_moe <= 2**20:
            raise UsageError(f"--n-cpu-moe is {self.n_cpu_moe}; it must be 0 or more", "pass a layer count")
        if self.cpu_moe and self.n_cpu_moe:
            raise UsageError(
                "--cpu-moe and --n-cpu-moe both given",
                "--cpu-moe puts every layer's experts on the CPU; pass one of them",
            )
        if self.objective not in OBJECTIVES:
            raise UsageError(
                f"unknown planner objective {self.objective!r}", f"use one of {', '.join(OBJECTIVES)}"
            )
        for size, flag in (
            (self.gpu_budget_bytes, "--gpu-memory"),
            (self.cpu_budget_bytes, "--cpu-memory"),
            (self.reserve_bytes, "--reserve"),
        ):
            if size is not None and size < 0:
                raise UsageError(f"{flag} is negative", "give a size of zero or more")

    @property
    def cpu_dtypes(self) -> tuple[str, str] | None:
        """The forced (prefill, decode) CPU dtypes, or None to let the planner choose."""
        return cpu_dtype_pair(self.cpu_dtype)

    @property
    def context_tokens(self) -> int:
        """Prompt plus generated tokens: the KV cache's length at the end."""
        return self.prompt_len + self.max_new_tokens
