"""A bounded load test of a running `hetegen serve`: N concurrent clients, one chat request each.

Usage: python scripts/serve_load.py [--base-url http://127.0.0.1:8000/v1] [--clients 40]
       [--max-tokens 8] [--model smollm2-135m] [--api-key KEY] [--json]

Every client sends one non-streaming chat completion at the same moment (a barrier), greedy,
with its own prompt. Prints: requests, completed, 429s, other failures (a lost request is a
failure), latency p50/p95 of the completed ones, completion tokens per second over the wall
time, and the server's /health afterwards. Exit 1 when any request failed other than 429.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    barrier = threading.Barrier(args.clients)
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        body = {
            "model": args.model,
            "messages": [{"role": "user", "content": f"Give me fact number {i} about the sea."}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }
        barrier.wait()
        start = time.perf_counter()
        try:
            r = httpx.post(f"{args.base_url}/chat/completions", json=body, headers=headers, timeout=600)
            entry = {"status": r.status_code, "latency_s": time.perf_counter() - start}
            if r.status_code == 200:
                entry["tokens"] = r.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            entry = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
        with lock:
            results.append(entry)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    done = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 429]
    failed = [r for r in results if r["status"] not in (200, 429)]
    latencies = [r["latency_s"] for r in done]
    tokens = sum(r["tokens"] for r in done)
    health = httpx.get(args.base_url.removesuffix("/v1") + "/health", timeout=10).json()
    report = {
        "requests": len(results),
        "completed": len(done),
        "rejected_429": len(busy),
        "failed": len(failed),
        "failures": failed[:5],
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "completion_tokens": tokens,
        "wall_s": wall,
        "completion_tokens_per_s": tokens / wall if wall > 0 else None,
        "health_after": health,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['requests']} requests: {report['completed']} completed, "
            f"{report['rejected_429']} got 429, "
            f"{report['failed']} failed; latency p50 {report['latency_p50_s']:.2f} s, p95 "
            f"{report['latency_p95_s']:.2f} s; {tokens} tokens in {wall:.1f} s = "
            f"{report['completion_tokens_per_s']:.1f} tok/s; health after: {health['status']}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
