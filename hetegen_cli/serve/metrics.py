"""Prometheus metrics of one server (`GET /metrics`, text exposition format).

Each server has its own registry, so several in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Counters and gauges a server updates; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "hetegen_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("hetegen_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("hetegen_completion_tokens", "Tokens generated", registry=r)
        self.rejected = Counter(
            "hetegen_rejected", "Requests refused with 429: the queue was full", registry=r
        )
        self.cancelled = Counter(
            "hetegen_cancelled",
            "Generations stopped because the client went away or the server stopped",
            registry=r,
        )
        self.queue_length = Gauge("hetegen_queue_length", "Requests waiting for the model", registry=r)
        self.running = Gauge("hetegen_running", "Requests generating now (0 or 1)", registry=r)
        self.decode_rate = Gauge(
            "hetegen_decode_tokens_per_second", "Decode speed of the last finished generation", registry=r
        )
        self.latency = Histogram(
            "hetegen_request_seconds",
            "Time from a generation request's arrival to its last token (queue included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "hetegen_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token (queue included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
