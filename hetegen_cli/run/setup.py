"""What a command asks for, in two parts: what to load (`ModelSetup`, shared by run, serve and
eval) and what to generate (`GenerationRequest`, run's). Both are checked on construction or
before anything slow (UsageError); sizes in bytes.

A server or an evaluation loads a model without a prompt: they say what a plan made on the fly
is made for with a `Workload` of their own, not with a made-up prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hetegen_cli.core.dtypes import DTYPE_CHOICES
from hetegen_cli.core.errors import UsageError
from hetegen_cli.core.quant import check_quant
from hetegen_cli.run.text import SamplingOptions

DEVICE_CHOICES = ("auto", "cpu", "cuda")
MAX_TOKENS = 2**24  # beyond any model's context


@dataclass(frozen=True)
class Workload:
    """The tokens a plan made on the fly is made for (and the GPU's fit is judged by): the
    prompt's and the new ones."""

    prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class ModelSetup:
    """What to load, and how: the same for run, serve and eval.

    `plan_path` and `gpu_budget_bytes` exclude each other (a plan fixes its budget). The
    workload a plan is made for is the command's (run: its prompt; serve: its context; eval:
    its window), given when the build is decided (run.builders.decide_build).
    """

    model: str | None = None  # --model as typed; None = the default model
    quant: str = "auto"  # auto (as stored) | none | int8 | int4 (core.quant)
    allow_float_copy: bool = False  # GGUF types no hetegen format takes: bfloat16, not refused
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    plan_path: Path | None = None
    gpu_budget_bytes: int | None = None  # --gpu-memory, parsed at the CLI edge
    profile_path: Path | None = None
    cpu_moe: bool = False  # MoE models: every routed expert on the CPU (a plan made on the fly)
    n_cpu_moe: int = 0  # ... or those of the first N decoder layers
    expert_split: bool = True  # ... split in decode where it pays (--no-expert-split: False)
    expert_use_path: Path | None = None  # MoE models: counts that place the experts (eval --expert-use)

    def __post_init__(self) -> None:
        if self.model is not None and not self.model.strip():
            raise UsageError("--model is empty", "leave --model out for the default model, or name one")
        check_quant(self.quant)
        for value, flag, choices in (
            (self.dtype, "--dtype", DTYPE_CHOICES),
            (self.device, "--device", DEVICE_CHOICES),
        ):
            if value not in choices:
                raise UsageError(f"unknown {flag} {value!r}", f"use one of {', '.join(choices)}")
        if self.plan_path is not None and self.gpu_budget_bytes is not None:
            raise UsageError(
                "--plan and --gpu-memory cannot be combined",
                "the plan already fixes the GPU budget; re-plan to change it",
            )
        flags = (("--cpu-moe", self.cpu_moe), ("--n-cpu-moe", self.n_cpu_moe))
        placing = [f for f, on in (*flags, ("--no-expert-split", not self.expert_split)) if on]
        if self.expert_use_path is not None:
            placing.append("--expert-use")
        if self.plan_path is not None and placing:
            raise UsageError(
                f"--plan and {placing[0]} cannot be combined",
                "the plan already places the experts; pass the flag to `hetegen plan` instead",
            )
        if self.device == "cpu" and self.gpu_budget_bytes is not None:
            raise UsageError(
                "--gpu-memory has no effect with --device cpu",
                "drop one of them: --device cpu runs without a GPU budget",
            )


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: the prompt (the user message with `chat`), how many tokens at most,
    how to sample."""

    prompt: str
    chat: bool = False
    max_new_tokens: int = 64
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def validate(self) -> None:
        """UsageError for an empty prompt, a token count out of range or bad sampling."""
        if not self.prompt or not self.prompt.strip():
            raise UsageError(
                "the prompt is empty", 'pass some text, e.g. --prompt "The capital of France is"'
            )
        if not 1 <= self.max_new_tokens <= MAX_TOKENS:
            raise UsageError(
                f"--max-new-tokens {self.max_new_tokens} is outside [1, {MAX_TOKENS}]",
                "ask for at least 1 token",
            )
        self.sampling.validate()
