"""`run` as a library call: validate -> resolve the model -> tokenize -> check the context ->
decide the build (device, dtype, plan: run.builders) -> load it -> generate.

`execute_run(setup, request)` is the entry point: what to load (ModelSetup) and what to
generate (GenerationRequest); its "load" step is replaceable (`ModelLoader`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from hetegen_cli.core.console import activity
from hetegen_cli.core.devices import out_of_memory_as_error
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.run.builders import (
    BuildRecord,
    ModelLoader,
    Resolved,
    decide_build,
    load_build,
    resolve_setup,
)
from hetegen_cli.run.generate import GenerationResult, SamplingOptions, generate, prepare_prompt
from hetegen_cli.run.predicted import predict_run
from hetegen_cli.run.setup import GenerationRequest, ModelSetup, Workload

RUN_KIND = "hetegen.run"
RUN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PreparedRun:
    """A run before any weight is read: the checked setup, the prompt's tokens, the build."""

    request: GenerationRequest
    resolved: Resolved
    prompt_ids: list[int]
    record: BuildRecord


@dataclass
class RunResult:
    run: PreparedRun
    built: LoadedModel
    generation: GenerationResult
    engine_stats: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # run.predicted: predicted beside measured, per phase
    #: where the wall time went, in seconds (`wall_split`): import, resolve, load, generate
    wall: dict[str, float] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        ref, gen, request = self.run.resolved.ref, self.generation, self.run.request
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
            "prompt": request.prompt,
            "chat": request.chat,
            "prompt_token_ids": gen.prompt_token_ids,
            "text": gen.text,
            "token_ids": gen.token_ids,
            "stop_reason": gen.stop_reason,
            "sampling": sampling_document(request.sampling),
            "timings": {"load_s": self.built.load_s, **gen.timings.as_dict(), "wall": self.wall_split()},
            "engine": self.built.engine,
            "device": self.built.device,
            "dtype": self.built.dtype,
            "fused": self.built.fused,
            "quant": ref.spec.quant or "none",
            "plan": self.run.record.plan_section(),
            "engine_stats": self.engine_stats,
            "prediction": self.prediction,
        }

    def wall_split(self) -> dict[str, float]:
        """Where the process's wall time went, so far: `import_s` (Python, the CLI, torch and
        transformers' model code: the process's start to the run's, plus
        models.loading.loader.import_model_code), `resolve_s` (the model's files and caches,
        the tokenizer, the plan and the checks), `load_s` (the weights), `prefill_s`,
        `decode_s` (the generation's own timings), `generate_s` (both, with streaming and
        the tokenizer's decoding), `other_s` (the rest: streaming, the prediction, exiting),
        `total_s`. import, resolve, load, prefill, decode and other add up to the total."""
        t = self.generation.timings
        split = {**self.wall, "prefill_s": t.prefill_s, "decode_s": t.decode_s}
        parts = sum(split.get(k, 0.0) for k in ("import_s", "resolve_s", "load_s", "prefill_s", "decode_s"))
        total = max(process_age_s(), parts)
        return {**split, "other_s": total - parts, "total_s": total}


def sampling_document(s: SamplingOptions) -> dict[str, Any]:
    return {
        "mode": "greedy" if s.greedy else "sample",
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
    }


def prepare_run(setup: ModelSetup, request: GenerationRequest) -> PreparedRun:
    """Every check that needs no weights, cheapest first: the request, the plan file, the
    model's path and headers, the plan against the model, the prompt's tokens and context;
    then the build for this prompt (run.builders.decide_build)."""
    request.validate()
    resolved = resolve_setup(setup)
    prompt_ids = prepare_prompt(resolved.tokenizer, request.prompt, chat=request.chat)
    resolved.ref.spec.check_context(len(prompt_ids), request.max_new_tokens)
    record = decide_build(resolved, Workload(len(prompt_ids), request.max_new_tokens))
    return PreparedRun(request, resolved, prompt_ids, record)


def execute_run(
    setup: ModelSetup,
    request: GenerationRequest,
    on_text: Callable[[str], None] | None = None,
    load: ModelLoader = load_build,
) -> RunResult:
    """Validate, build the model, generate. `on_text` receives streamed pieces; `load` reads
    the weights as the decided BuildRecord says (run.builders.load_build)."""
    startup = process_age_s()  # Python, the CLI and its imports (torch among them)
    start = time.perf_counter()
    run = prepare_run(setup, request)
    resolving = time.perf_counter() - start
    wall = {"import_s": startup + run.resolved.import_s, "resolve_s": resolving - run.resolved.import_s}
    with load(run.record) as built:
        wall["load_s"] = time.perf_counter() - start - resolving
        generating = time.perf_counter()
        with out_of_memory_as_error("generating"), activity("generating"):
            result = generate(
                built.model,
                run.resolved.tokenizer,
                run.prompt_ids,
                max_new_tokens=request.max_new_tokens,
                sampling=request.sampling,
                on_text=on_text,
                sync=built.sync,
                device=built.device,
            )
        wall["generate_s"] = time.perf_counter() - generating
        stats = built.stats()
    t, record = result.timings, run.record
    prediction = predict_run(
        record.spec,
        engine=built.engine,
        device=built.device,
        dtype=record.formats.weights,
        plan=record.plan,
        backend_name=record.backend.name if record.plan is not None else None,
        prompt_tokens=t.prompt_tokens,
        generated_tokens=t.generated_tokens,
        prefill_s=t.prefill_s,
        decode_s=t.decode_s,
        decode_steps=t.decode_steps,
        profile_path=setup.profile_path,
    )
    return RunResult(run, built, result, stats, prediction, wall)


def process_age_s() -> float:
    """Seconds since this process started (the interpreter's start, before any import)."""
    return max(0.0, time.time() - psutil.Process().create_time())
