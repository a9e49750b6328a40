"""Prometheus metrics of one server (`GET /metrics`, text exposition format).

Each server has its own registry, so several in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and gauges a server updates; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        counter, gauge, histogram = self._kind(Counter), self._kind(Gauge), self._kind(Histogram)
        self.requests = counter(
            "requests", "HTTP requests answered, by route and status code", ["route", "status"]
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.completion_tokens = counter("completion_tokens", "Tokens generated")
        self.rejected = counter("rejected", "Requests refused with 429: the queue was full")
        self.cancelled = counter(
            "cancelled", "Generations stopped because the client went away or the server stopped"
        )
        self.queue_length = gauge("queue_length", "Requests waiting for the model")
        self.running = gauge("running", "Requests generating now (0 or 1)")
        self.decode_rate = gauge("decode_tokens_per_second", "Decode speed of the last finished generation")
        arrival = "Time from a generation request's arrival to its {} token (queue included)"
        self.latency = histogram("request_seconds", arrival.format("last"), buckets=LATENCY_BUCKETS)
        self.first_token = histogram(
            "time_to_first_token_seconds", arrival.format("first"), buckets=LATENCY_BUCKETS
        )

    def _kind(self, kind: type) -> Callable[..., Any]:
        """A maker of `kind` metrics named hetegen_<name> in this server's registry."""
        return lambda name, text, *labels, **kw: kind(
            f"hetegen_{name}", text, *labels, registry=self.registry, **kw
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
