"""The engine's operations as a trace, for replay in a discrete-event model (docs/engine.md,
"Trace"; plan.simulate replays it).

A `Tracer` attached to an EngineContext (`ctx.tracer`) records, in the order the main thread
issues them, every operation a GPU would see: copies (direction, stream, what: a layer input
`x`, a CPU result `y`, a weight share), kernels (matmul, dequantization, bias), the CPU share
(computed on the main thread, which blocks for it), events recorded and waited for on a
stream, and host waits for an event. Each op carries `gap_s`: host seconds since the previous
op ended, the Python and dispatch work in between. Ops name their linear and rows, never
bytes: the replay takes sizes from the plan, so a trace recorded on a small proxy model with
the same layers and placements describes the full-size model.

Op records (dicts, JSON-ready), `op` is one of:
  pass   {phase}                                  a model forward starts
  copy   {dir: h2d|d2h, stream, what: x|y|weight, linear, rows, tokens}
  kernel {stream, what: matmul|dequant|bias, linear, rows, tokens}
  cpu    {linear, rows, tokens}                   the CPU share, on the main thread (blocking)
  record {stream, event}    wait {stream, event}  (stream-side)    sync {event} (host blocks)
  experts {experts, tokens}                       a MoE layer's routed experts (engine.experts):
                                                  one op after the host issued their GPU work,
                                                  before its wait and the CPU side; the replay
                                                  expands it from the plan's placement
`stream` is "compute" (the device's current stream) or "copy" (the prefetch copy stream).
"""

from __future__ import annotations

import time
from typing import Any

TRACE_KIND = "hetegen.trace"
TRACE_VERSION = 1


class Tracer:
    """Collects op records (module docstring) for one or more model forwards."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self._last = time.perf_counter()
        self._event_ids: dict[int, int] = {}  # id(event object) -> id of its latest record
        self._next_event = 0

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def op(self, op: str, **fields: Any) -> None:
        """A non-blocking op, just issued: the host time since the last op counts as host work."""
        now = time.perf_counter()
        self.ops.append({"op": op, "gap_s": now - self._last, **fields})
        self._last = now

    def blocking(self, op: str, started: float, **fields: Any) -> None:
        """A blocking op that began at `started` (Tracer.now()) and has just returned: the
        time it blocked is not host work (the replay models it)."""
        self.ops.append({"op": op, "gap_s": max(0.0, started - self._last), **fields})
        self._last = time.perf_counter()

    def recorded(self, event: Any, stream: str) -> None:
        """`event` was (re-)recorded on `stream`: a new record id."""
        self._next_event += 1
        self._event_ids[id(event)] = self._next_event
        self.op("record", stream=stream, event=self._next_event)

    def event_id(self, event: Any) -> int:
        """The id of `event`'s latest record (0: an event recorded before tracing started,
        complete as far as the replay is concerned)."""
        return self._event_ids.get(id(event), 0)

    def split(self) -> dict[str, list[dict[str, Any]]]:
        """The ops of each traced forward by phase: {"prefill": [...], "decode": [...]}, the
        last forward of each phase (later ones replace earlier ones)."""
        phases: dict[str, list[dict[str, Any]]] = {}
        current: list[dict[str, Any]] | None = None
        for record in self.ops:
            if record["op"] == "pass":
                current = phases[record["phase"]] = []
            if current is not None:
                current.append(record)
        return phases


def trace_steps(model: Any, prompt_len: int, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Trace one prefill of `prompt_len` random tokens and one decode step of `model` (loaded
    by engine.hetero_model.load_hetero_model) after an untraced warm-up of both, so the
    prefetch order and every buffer are in their steady state. Returns the trace document:
    {kind, version, backend, prompt_len, phases: {"prefill": [ops], "decode": [ops]}}."""
    import torch

    ctx = model.hetegen_engine
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prompt_len), generator=generator).to(ctx.backend.device)

    def prefill_then_decode() -> None:
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        ctx.backend.synchronize()

    with torch.inference_mode():
        prefill_then_decode()  # warm-up: learn the order, size the scratch, first-use caches
        tracer = Tracer()
        ctx.attach_tracer(tracer)
        try:
            prefill_then_decode()
        finally:
            ctx.attach_tracer(None)
    return {
        "kind": TRACE_KIND,
        "version": TRACE_VERSION,
        "backend": ctx.backend.name,
        "prompt_len": prompt_len,
        "phases": tracer.split(),
    }
