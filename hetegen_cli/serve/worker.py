"""One generation at a time, the others in a bounded queue (batch 1).

All torch work of a server (loading, generating, closing) runs on one `ModelThread`. torch's
OpenMP runtime gives every thread that runs a parallel region its own team of threads; a
second team oversubscribes the cores, and libgomp then stops spinning between regions: on a
2-core machine SmolLM2-135M decoded at 18-19 tok/s from a worker thread once the main thread
had run torch ops, against 32-33 tok/s when one thread did everything (docs/serve.md).

`Worker.run(job, gone)` waits for the model (FIFO; 429 beyond `max_queue` waiting), runs the
generation on the worker thread and streams its text back to the event loop. Text pieces pass
through the job's stop strings first. A job whose client is gone (`gone()` true), or which the
server cancels at shutdown, stops at its next token; the model is handed to the next job only
when the generation thread has really finished.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from hetegen_cli.run.generate import GenerationResult, SamplingOptions
from hetegen_cli.serve.metrics import Metrics
from hetegen_cli.serve.model import ServedModel
from hetegen_cli.serve.protocol import ApiError
from hetegen_cli.serve.stops import StopText

#: how often a waiting or running request checks whether its client went away (seconds)
POLL_S = 0.1


class ModelThread(Executor):
    """A single daemon thread that runs every call submitted to it, in order. Daemon, so a
    Ctrl-C during a long model load ends the process instead of waiting for the load."""

    def __init__(self, name: str = "hetegen-model") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._calls.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    """One generation request, tokenized and validated."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions
    stops: list[str] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    text: str = ""  # emitted text (stop strings cut)
    finish_reason: str = "length"  # "stop" or "length" (OpenAI's names)
    queue_s: float = 0.0
    first_text_s: float | None = None  # from arrival to the first emitted token


Gone = Callable[[], Awaitable[bool]]


class Running:
    """A started job: iterate it for its text pieces. Leaving the iteration early (a client
    gone, an error) cancels the job at its next token; at the end it re-raises a generation
    error and records the metrics."""

    def __init__(
        self, job: Job, pieces: asyncio.Queue, future: asyncio.Future, watcher: asyncio.Future, worker: Worker
    ) -> None:
        self.job, self.pieces, self.future, self.watcher, self.worker = job, pieces, future, watcher, worker

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while (piece := await self.pieces.get()) is not None:
                yield piece
            await self.future  # re-raises a generation error (ModelError, out of memory)
            self.worker._record(self.job)
        finally:
            if not self.future.done():
                self.worker.cancel(self.job)


class Worker:
    """The model's only door. Create inside the server's event loop."""

    def __init__(self, served: ServedModel, max_queue: int, metrics: Metrics, thread: ModelThread) -> None:
        self.served = served
        self.max_queue = max_queue
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._executor = thread  # the thread that loaded the model (see the module docstring)
        self._jobs: set[Job] = set()  # admitted and not finished (for shutdown)
        self.waiting = 0
        self.closing = False

    # --- admission -----------------------------------------------------------------------

    async def _admit(self, job: Job, gone: Gone) -> None:
        """Wait for the model. ApiError 429 when the queue is full, 503 when shutting down;
        asyncio.CancelledError when the client goes away while waiting."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self._lock.locked() and self.waiting >= self.max_queue:
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                f"the server is busy: one request is generating and {self.waiting} are waiting "
                f"(--max-queue {self.max_queue}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        self.metrics.queue_length.set(self.waiting)
        acquire = asyncio.ensure_future(self._lock.acquire())
        try:
            while not acquire.done():
                await asyncio.wait({acquire}, timeout=POLL_S)
                if not acquire.done() and await gone():
                    acquire.cancel()
                    self.metrics.cancelled.inc()
                    raise asyncio.CancelledError
        except BaseException:
            acquire.cancel()
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                self._lock.release()
            raise
        finally:
            self.waiting -= 1
            self.metrics.queue_length.set(self.waiting)
        if self.closing:
            self._lock.release()
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")

    # --- running -------------------------------------------------------------------------

    def _generate(self, job: Job, loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue) -> None:
        """Worker thread: generate, pushing emitted text to `pieces` (None marks the end)."""
        stops = StopText(job.stops)

        def on_text(piece: str) -> None:
            out = stops.push(piece)
            if out:
                if job.first_text_s is None:
                    job.first_text_s = time.perf_counter() - job.arrived
                job.text += out
                loop.call_soon_threadsafe(pieces.put_nowait, out)

        def should_stop() -> str | None:
            if stops.hit:
                return "stop"
            return "cancelled" if job.cancel.is_set() else None

        try:
            job.result = self.served.generate(
                job.prompt_ids, job.max_tokens, job.sampling, on_text, should_stop
            )
            tail = stops.flush()
            if tail:
                job.text += tail
                loop.call_soon_threadsafe(pieces.put_nowait, tail)
            reason = job.result.stop_reason
            job.finish_reason = "stop" if reason in ("eos", "stop") or stops.hit else "length"
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, None)

    async def start(self, job: Job, gone: Gone) -> Running:
        """Admit `job` (ApiError 429/503; CancelledError when the client leaves while
        waiting), then start it on the generation thread. A watcher cancels it at its next
        token once `gone()` turns true; the model is released when the thread has finished,
        whatever the caller does with the returned Running."""
        await self._admit(job, gone)
        try:
            job.queue_s = time.perf_counter() - job.arrived
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue = asyncio.Queue()
            self._jobs.add(job)
            self.metrics.running.set(1)
            future = loop.run_in_executor(self._executor, self._generate, job, loop, pieces)
        except BaseException:
            self._finished(job)  # the model must never stay taken
            raise
        future.add_done_callback(lambda _: self._finished(job))
        watcher = asyncio.ensure_future(self._watch(job, future, gone))
        return Running(job, pieces, future, watcher, self)

    async def _watch(self, job: Job, future: asyncio.Future, gone: Gone) -> None:
        while not future.done():
            await asyncio.wait({future}, timeout=POLL_S)
            if not future.done() and not job.cancel.is_set() and await gone():
                self.cancel(job)

    async def run(self, job: Job, gone: Gone) -> Job:
        """Admit and run `job` to the end; the job with its text and result."""
        running = await self.start(job, gone)
        async for _ in running:
            pass
        return job

    def _finished(self, job: Job) -> None:
        self._jobs.discard(job)
        self.metrics.running.set(0)
        self._lock.release()

    def _record(self, job: Job) -> None:
        r = job.result
        if r is None:
            return
        m = self.metrics
        m.prompt_tokens.inc(len(job.prompt_ids))
        m.completion_tokens.inc(len(r.token_ids))
        if r.timings.decode_tokens_per_s:
            m.decode_rate.set(r.timings.decode_tokens_per_s)
        m.latency.observe(time.perf_counter() - job.arrived)
        if job.first_text_s is not None:
            m.first_token.observe(job.first_text_s)

    # --- shutdown ------------------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        """Stop `job` at its next token (counted once)."""
        if not job.cancel.is_set():
            job.cancel.set()
            self.metrics.cancelled.inc()

    def cancel_all(self) -> None:
        """Refuse new jobs and stop the running one at its next token."""
        self.closing = True
        for job in list(self._jobs):
            self.cancel(job)

    def close(self) -> None:
        """cancel_all, then wait until the model thread has finished what it was running."""
        self.cancel_all()
        self._executor.submit(lambda: None).result()
