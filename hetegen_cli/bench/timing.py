"""Timing one arm of `hetegen bench`: warm-up and timed generations, RSS sampling, logits.

Every arm is driven by the same loop (run.generate.generate: prefill, then a KV-cached greedy
decode with EOS ignored, clock read after device synchronisation).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil
import torch

from hetegen_cli.core.devices import out_of_memory_as_error
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.run.generate import generate

RSS_INTERVAL_S = 0.01


class RssSampler:
    """Peak resident set size of this process in bytes, sampled every RSS_INTERVAL_S in a
    thread; and where the OS reports file-backed pages (Linux), the peak of the anonymous part
    alone (`peak_anon`: RSS less the file pages, which include a safetensors file's memory
    map: the kernel reclaims those under pressure, so they overstate what a model needs)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.peak_anon: int | None = None
        self.before = self.peak = 0
        self._sample()
        self.before = self.peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hetegen-rss", daemon=True)

    def _sample(self) -> None:
        info = self._proc.memory_info()
        self.peak = max(self.peak, int(info.rss))
        shared = getattr(info, "shared", None)  # Linux: RssFile + RssShmem
        if shared is not None:
            self.peak_anon = max(self.peak_anon or 0, int(info.rss) - int(shared))

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class _IdsOnly:
    """Tokenizer stand-in for generate(): the bench feeds ids and never needs text."""

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return ""


def _logit_probe(model: Any) -> tuple[list, Any]:
    """Record (top-2 ids, top1 - top2 margin, top1 logit) of every forward's last position."""
    steps: list = []

    def hook(module: Any, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None:
            top = torch.topk(logits[0, -1].float(), 2)  # logits [1, T', V]
            v = top.values.tolist()
            steps.append((top.indices.tolist(), v[0] - v[1], v[0]))

    return steps, model.register_forward_hook(hook)


def timed_runs(
    built: LoadedModel,
    ids: list[int],
    max_new_tokens: int,
    warmup: int,
    repeat: int,
    on_run: Callable[[], None] | None = None,
) -> tuple[list[dict], list[list[int]], dict]:
    """`warmup` discarded runs, then `repeat` timed runs.

    The first warm-up run (or, without warm-up, one extra untimed run) also records the top-2
    logits of every step for the token check. Returns (timings dicts, tokens per timed run,
    {"tokens", "top2_ids", "margins", "top1_logits"} of the check run).
    """
    samples, tokens, check = [], [], {}
    untimed = max(warmup, 1)
    for i in range(untimed + repeat):
        if i == untimed:
            built.reset_stats()
        probe = _logit_probe(built.model) if i == 0 else None
        try:
            with out_of_memory_as_error("benchmarking"):
                result = generate(
                    built.model,
                    _IdsOnly(),
                    ids,
                    max_new_tokens=max_new_tokens,
                    eos_ids=set(),
                    sync=built.sync,
                    device=built.device,
                )
        finally:
            if probe:
                probe[1].remove()
        if probe:
            steps = probe[0]
            check = {
                "tokens": list(result.token_ids),
                "top2_ids": [s[0] for s in steps],
                "margins": [s[1] for s in steps],
                "top1_logits": [s[2] for s in steps],
            }
        if i >= untimed:
            samples.append(result.timings.as_dict())
            tokens.append(list(result.token_ids))
        if on_run and i >= untimed - warmup:
            on_run()
    return samples, tokens, check
