"""The model a server holds: loaded once, as `hetegen run` would load it (plain, or through
the engine with a plan or one planned on the fly), then used for one generation at a time.

Options are checked (cheapest first) before anything is loaded: the plan file, the model's
files and headers, the plan against the model, the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hetegen_cli.core.errors import UsageError
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.loading.source import ModelRef
from hetegen_cli.run.builders import build_plain_model, choose_builder, pick_device, resolve_checked
from hetegen_cli.run.context import EngineOptions, RunContext, RunOptions
from hetegen_cli.run.generate import GenerationResult, SamplingOptions, StopCheck, eos_token_ids, generate

#: the context a server plans for when the model's own is longer (or unknown)
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ServeOptions:
    """What `hetegen serve` was asked. Sizes in bytes; checked on construction (UsageError)."""

    model: str | None = None
    plan_path: Path | None = None
    gpu_budget_bytes: int | None = None
    profile_path: Path | None = None
    dtype: str = "auto"
    device: str = "auto"
    quant: str = "auto"  # auto | none | int8 | int4 (core.quant)
    allow_float_copy: bool = False  # --allow-float-copy (RunOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 16  # requests waiting while one generates; beyond: 429
    context: int | None = None  # prompt + completion tokens per request (default: the model's, <= 4096)
    default_max_tokens: int = 256  # completion tokens when a request gives no max_tokens
    grace_s: float = 10.0  # on SIGTERM/Ctrl-C: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        for value, flag, low, high in (
            (self.port, "--port", 0, 65535),
            (self.max_queue, "--max-queue", 0, 100_000),
            (self.default_max_tokens, "--max-tokens", 1, 2**24),
            (self.context if self.context is not None else 1, "--context", 1, 2**24),
        ):
            if not low <= value <= high:
                raise UsageError(
                    f"{flag} is {value}; it must be in [{low}, {high}]", f"pass a {flag} in that range"
                )
        if not 0 <= self.grace_s <= 3600:
            raise UsageError(
                f"--grace is {self.grace_s}; it must be in [0, 3600] seconds", "pass e.g. --grace 10"
            )
        if self.plan_path is not None and self.gpu_budget_bytes is not None:
            raise UsageError(
                "--plan and --gpu-memory cannot be combined", "the plan already fixes the GPU budget"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty", "pass a non-empty key, or drop --api-key")


@dataclass
class ServedModel:
    """One loaded model and its tokenizer. `generate` runs on the caller's thread."""

    model_id: str
    ref: ModelRef
    tokenizer: Any
    built: LoadedModel
    context: int  # prompt + completion tokens a request may use
    default_max_tokens: int
    eos_ids: set[int] = field(default_factory=set)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> dict[str, Any]:
        b = self.built
        return {"engine": b.engine, "device": b.device, "dtype": b.dtype, "context": self.context}

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingOptions,
        on_text: Callable[[str], None],
        should_stop: StopCheck,
    ) -> GenerationResult:
        return generate(
            self.built.model,
            self.tokenizer,
            prompt_ids,
            max_new_tokens=max_tokens,
            sampling=sampling,
            eos_ids=self.eos_ids,
            on_text=on_text,
            sync=self.built.sync,
            device=self.built.device,
            should_stop=should_stop,
        )

    def close(self) -> None:
        self.built.close()


@dataclass
class ServeSetup:
    """Everything known before weights are read: the model, its tokenizer, the context and
    how to build it. `load()` reads the weights (on the calling thread)."""

    ref: ModelRef
    tokenizer: Any
    context: int
    default_max_tokens: int
    run: RunContext
    build: Callable[[RunContext], LoadedModel]

    def load(self) -> ServedModel:
        built = self.build(self.run)
        return ServedModel(
            model_id=self.ref.name,
            ref=self.ref,
            tokenizer=self.tokenizer,
            built=built,
            context=self.context,
            default_max_tokens=self.default_max_tokens,
            eos_ids=eos_token_ids(built.model, self.tokenizer),
        )


def prepare_serving(options: ServeOptions) -> ServeSetup:
    """Every check that needs no weights, cheapest first: the plan file, the model's files and
    headers, the plan against the model, the context; then how the model will be built."""
    engine = EngineOptions(options.plan_path, options.gpu_budget_bytes, options.profile_path)
    run = RunOptions(
        prompt="(hetegen serve)",
        model=options.model,
        max_new_tokens=options.default_max_tokens,
        dtype=options.dtype,
        device=options.device,
        quant=options.quant,
        allow_float_copy=options.allow_float_copy,
    )
    plan, ref, tokenizer = resolve_checked(run, engine)
    limit = ref.spec.max_positions or DEFAULT_CONTEXT
    planned = None
    if plan is not None:  # its KV cache and workspace were budgeted for this many tokens
        planned = plan.workload.prompt_len + plan.workload.max_new_tokens
        limit = min(limit, planned)
    context = options.context or min(limit, DEFAULT_CONTEXT)
    if context > limit:
        by_plan = planned == limit
        why = f"the plan's {planned} tokens (prompt + new)" if by_plan else f"the model's {limit} positions"
        raise UsageError(
            f"--context {context} exceeds {why}",
            f"pass --context {limit} or less"
            + (", or re-plan with a larger --prompt-len / --max-new-tokens" if by_plan else ""),
        )
    default_max = min(options.default_max_tokens, max(1, context // 2))
    run = replace(run, max_new_tokens=default_max)
    workload_prompt = max(1, context - default_max)  # a plan made here reserves the whole context
    backend, dtype, fits = pick_device(run, ref, workload_prompt)
    ctx = RunContext(
        run, ref, tokenizer, [], backend, dtype, fits, plan, workload_prompt_tokens=workload_prompt
    )
    build = choose_builder(ctx, engine) or build_plain_model
    return ServeSetup(ref, tokenizer, context, default_max, ctx, build)
