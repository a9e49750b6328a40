"""`run` as a library call: validate -> resolve the model -> tokenize -> check the context ->
pick device and dtype -> build the model (plain or engine, run.builders) -> generate.

`execute_run(options)` is the entry point; its "build" step is replaceable (`ModelBuilder`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from hetegen_cli.core.console import activity
from hetegen_cli.core.devices import out_of_memory_as_error
from hetegen_cli.core.errors import UsageError
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.run.builders import build_plain_model, choose_builder, pick_device, resolve_checked
from hetegen_cli.run.context import EngineOptions, ModelBuilder, RunContext, RunOptions
from hetegen_cli.run.generate import GenerationResult, SamplingOptions, generate, prepare_prompt
from hetegen_cli.run.predicted import predict_run

RUN_KIND = "hetegen.run"
MAX_TOKENS = 2**24  # beyond any model's context
RUN_SCHEMA_VERSION = 1


@dataclass
class RunResult:
    context: RunContext
    built: LoadedModel
    generation: GenerationResult
    engine_stats: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # run.predicted: predicted beside measured, per phase
    #: where the wall time went, in seconds: startup (the process's start to the run's: Python
    #: and the CLI), resolve (the model, its tokenizer, the plan and the checks), load,
    #: generate (prefill and decode)
    wall: dict[str, float] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        ref, gen = self.context.ref, self.generation
        return {
            "schema_version": RUN_SCHEMA_VERSION,
            "kind": RUN_KIND,
            "model": {
                "name": ref.name,
                "source": ref.kind,
                "arg": ref.arg,
                "path": str(ref.path) if ref.path else None,
                "hub_id": ref.hub_id,
                "architecture": ref.spec.architecture,
                "layers": ref.spec.num_layers,
                "parameters": ref.spec.parameter_count,
                "max_positions": ref.spec.max_positions,
            },
            "prompt": self.context.options.prompt,
            "chat": self.context.options.chat,
            "prompt_token_ids": gen.prompt_token_ids,
            "text": gen.text,
            "token_ids": gen.token_ids,
            "stop_reason": gen.stop_reason,
            "sampling": sampling_document(self.context.options.sampling),
            "timings": {"load_s": self.built.load_s, **gen.timings.as_dict(), "wall": self.wall},
            "engine": self.built.engine,
            "device": self.built.device,
            "dtype": self.built.dtype,
            "quant": self.context.ref.spec.quant or "none",
            "plan": self.built.info.get("plan"),
            "engine_stats": self.engine_stats,
            "prediction": self.prediction,
        }


def sampling_document(s: SamplingOptions) -> dict[str, Any]:
    return {
        "mode": "greedy" if s.greedy else "sample",
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
    }


def prepare_run(options: RunOptions, engine: EngineOptions | None = None) -> RunContext:
    """Every check that needs no weights, cheapest first: the options, the plan file, the
    model's path and headers, the plan against the model, the prompt's tokens and context."""
    engine = engine or EngineOptions()
    if not options.prompt or not options.prompt.strip():
        raise UsageError("the prompt is empty", 'pass some text, e.g. --prompt "The capital of France is"')
    if not 1 <= options.max_new_tokens <= MAX_TOKENS:
        raise UsageError(
            f"--max-new-tokens {options.max_new_tokens} is outside [1, {MAX_TOKENS}]",
            "ask for at least 1 token",
        )
    options.sampling.validate()
    plan, ref, tokenizer = resolve_checked(options, engine)
    prompt_ids = prepare_prompt(tokenizer, options.prompt, chat=options.chat)
    ref.spec.check_context(len(prompt_ids), options.max_new_tokens)
    backend, dtype, fits = pick_device(options, ref, len(prompt_ids))
    return RunContext(options, ref, tokenizer, prompt_ids, backend, dtype, fits, plan)


def execute_run(
    options: RunOptions,
    on_text: Callable[[str], None] | None = None,
    build: ModelBuilder | None = None,
    engine: EngineOptions | None = None,
) -> RunResult:
    """Validate, build the model, generate. `on_text` receives streamed pieces.

    `build` defaults to run.builders.choose_builder's choice for `engine`: the heterogeneous
    engine when a plan applies, else the plain stock model.
    """
    engine = engine or EngineOptions()
    wall = {"startup_s": process_age_s()}
    start = time.perf_counter()
    ctx = prepare_run(options, engine)
    if build is None:
        build = choose_builder(ctx, engine) or build_plain_model
    wall["resolve_s"] = time.perf_counter() - start
    with build(ctx) as built:
        wall["load_s"] = time.perf_counter() - start - wall["resolve_s"]
        generating = time.perf_counter()
        with out_of_memory_as_error("generating"), activity("generating"):
            result = generate(
                built.model,
                ctx.tokenizer,
                ctx.prompt_ids,
                max_new_tokens=options.max_new_tokens,
                sampling=options.sampling,
                on_text=on_text,
                sync=built.sync,
                device=built.device,
            )
        wall["generate_s"] = time.perf_counter() - generating
        stats = built.stats()
    t = result.timings
    prediction = predict_run(
        built_spec(ctx),
        engine=built.engine,
        device=built.device,
        dtype=ctx.dtype,
        plan=getattr(build, "plan", None) or ctx.plan,
        backend_name=(built.info.get("plan") or {}).get("backend"),
        prompt_tokens=t.prompt_tokens,
        generated_tokens=t.generated_tokens,
        prefill_s=t.prefill_s,
        decode_s=t.decode_s,
        decode_steps=t.decode_steps,
        profile_path=engine.profile_path,
    )
    return RunResult(ctx, built, result, stats, prediction, wall)


def process_age_s() -> float:
    """Seconds since this process started (the interpreter's start, before any import)."""
    return max(0.0, time.time() - psutil.Process().create_time())


def built_spec(ctx: RunContext) -> Any:
    """The model's shapes in the dtype the run computes in (costmodel.predict re-derives a plan's)."""
    spec = ctx.ref.spec
    if spec.quant is None and spec.dtype != ctx.dtype and spec.config:
        from hetegen_cli.models.shapes.spec import spec_from_config

        return spec_from_config(spec.config, spec.name, dtype=ctx.dtype)
    return spec
