"""The `run --json` document and the wall-time split, shared by the regular path
(run.execute) and the direct one (run.direct); no torch."""

from __future__ import annotations

import time
from typing import Any

from hetegen_cli.models.loading.source import ModelRef
from hetegen_cli.run.setup import GenerationRequest
from hetegen_cli.run.text import GenerationResult, GenerationTimings, SamplingOptions

RUN_KIND = "hetegen.run"
RUN_SCHEMA_VERSION = 1
#: the parts of a run's wall time that are measured; `other_s` is the rest of the total
WALL_PARTS = ("import_s", "resolve_s", "load_s", "prefill_s", "decode_s")


def run_document(
    ref: ModelRef, request: GenerationRequest, gen: GenerationResult, load_s: float, wall: dict[str, float],
    **rest: Any,
) -> dict[str, Any]:  # fmt: skip
    """The run document: the model, the request, the generation, its timings (with `wall`,
    as `wall_split` gives it), then `rest` (engine, device, dtype, fused, quant, plan,
    engine_stats, prediction) in that order."""
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
        "timings": {"load_s": load_s, **gen.timings.as_dict(), "wall": wall},
        **rest,
    }


def sampling_document(s: SamplingOptions) -> dict[str, Any]:
    return {
        "mode": "greedy" if s.greedy else "sample",
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
    }


def wall_split(wall: dict[str, float], t: GenerationTimings) -> dict[str, float]:
    """Where the process's wall time went, so far: `import_s` (Python, the CLI and what it
    imported before the run's work: the process's start to the run's, plus importing model
    code), `resolve_s` (the model's files and caches, the tokenizer, the plan and the checks),
    `load_s` (the weights), `prefill_s`, `decode_s` (the generation's own timings),
    `generate_s` (both, with streaming and the tokenizer's decoding), `other_s` (the rest:
    streaming, the prediction, exiting), `total_s`. import, resolve, load, prefill, decode
    and other add up to the total."""
    split = {**wall, "prefill_s": t.prefill_s, "decode_s": t.decode_s}
    parts = sum(split.get(k, 0.0) for k in WALL_PARTS)
    total = max(process_age_s(), parts)
    return {**split, "other_s": total - parts, "total_s": total}


def process_age_s() -> float:
    """Seconds since this process started (the interpreter's start, before any import)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())
