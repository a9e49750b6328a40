"""`run` as a library call: validate -> resolve the model -> tokenize -> check the context ->
decide the build (device, dtype, plan: run.builders) -> load it -> generate.

`execute_run(setup, request)` is the entry point: what to load (ModelSetup) and what to
generate (GenerationRequest); its "load" step is replaceable (`ModelLoader`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetegen_cli.core.console import activity
from hetegen_cli.core.devices import out_of_memory_as_error
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.run import direct, direct_check
from hetegen_cli.run.builders import (
    BuildRecord,
    ModelLoader,
    Origin,
    Resolved,
    decide_build,
    load_build,
    resolve_setup,
)
from hetegen_cli.run.document import process_age_s, run_document, wall_split
from hetegen_cli.run.generate import GenerationResult, generate, prepare_prompt
from hetegen_cli.run.predicted import predict_run
from hetegen_cli.run.setup import GenerationRequest, ModelSetup, Workload


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
    direct_note: str | None = None  # what run.direct_check.remember did, to be said last

    def to_document(self) -> dict[str, Any]:
        built = self.built
        return run_document(
            self.run.resolved.ref, self.run.request, self.generation, built.load_s, self.wall_split(),
            engine=built.engine, device=built.device, dtype=built.dtype, fused=built.fused,
            quant=self.run.resolved.ref.spec.quant or "none", plan=self.run.record.plan_section(),
            engine_stats=self.engine_stats, prediction=self.prediction,
        )  # fmt: skip

    def wall_split(self) -> dict[str, float]:
        """Where the process's wall time went (run.document.wall_split)."""
        return wall_split(self.wall, self.generation.timings)

    @property
    def build_label(self) -> str:
        """'plain on cpu, float32': the engine, device and formats (the timing line's)."""
        return f"{self.built.engine} on {self.built.device}, {self.built.dtype}"

    @property
    def predicted_decode_tokens_per_s(self) -> float | None:
        """The plan's predicted decode speed, when the engine ran a plan."""
        plan = self.run.record.plan
        hetegen = plan.predictions.hetegen if plan is not None else None
        return hetegen.decode_tokens_per_s if hetegen is not None else None


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
    remember_direct: bool = False,
) -> RunResult:
    """Validate, build the model, generate. `on_text` receives streamed pieces; `load` reads
    the weights as the decided BuildRecord says (run.builders.load_build). With
    `remember_direct`, a quantized CPU model whose decode step is fused whole gets its
    direct-start record afterwards, if it has none (run.direct_check)."""
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
        said = None
        folder = run.record.ref.path
        wanted = remember_direct and os.environ.get(direct.ENV, "auto") != "off" and folder is not None
        if wanted and run.record.origin is Origin.QUANTIZED_CPU and (built.fused or {}).get("model"):
            said = direct_check.remember(
                built.model, folder, run.resolved.tokenizer, request.prompt, built.dtype
            )
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
    return RunResult(run, built, result, stats, prediction, wall, said)
