"""What `run` is asked to do (RunOptions, EngineOptions) and what it knows before loading
weights (RunContext). Sizes in bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetegen_cli.core.devices import Backend
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.loading.source import ModelRef
from hetegen_cli.plan.document import Plan
from hetegen_cli.run.generate import SamplingOptions


@dataclass(frozen=True)
class RunOptions:
    prompt: str
    model: str | None = None  # --model as typed; None = the default model
    chat: bool = False
    max_new_tokens: int = 64
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    quant: str = "auto"  # auto (as stored) | none | int8 | int4 (core.quant)
    allow_float_copy: bool = False  # --allow-float-copy: GGUF linears of unmapped types in bfloat16


@dataclass(frozen=True)
class EngineOptions:
    """How the heterogeneous engine is chosen: a saved plan, or a budget to plan on the fly."""

    plan_path: Path | None = None
    gpu_budget_bytes: int | None = None  # --gpu-memory, parsed at the CLI edge
    profile_path: Path | None = None


@dataclass
class RunContext:
    """Everything known before weights are loaded (input to a ModelBuilder)."""

    options: RunOptions
    ref: ModelRef
    tokenizer: Any
    prompt_ids: list[int]
    backend: Backend
    dtype: str  # resolved, never "auto"
    fits_on_gpu: bool = False  # the whole model fits in free GPU memory (plan.memory)
    plan: Plan | None = None  # the --plan file, loaded and checked against the model
    workload_prompt_tokens: int | None = None  # plan on the fly for this many (default: the prompt's)

    @property
    def planned_prompt_tokens(self) -> int:
        """The prompt length a plan made on the fly is made for: the prompt's, or a server's
        workload (`hetegen serve` plans for its context before any prompt arrives)."""
        return self.workload_prompt_tokens or len(self.prompt_ids)


ModelBuilder = Callable[[RunContext], LoadedModel]
