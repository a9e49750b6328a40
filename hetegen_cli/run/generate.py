"""Model-agnostic text generation: prompt preparation, prefill, a KV-cached decode loop.

Works with any module that answers `model(input_ids, cache=..., use_cache=True)` like a stock
transformers causal LM (the heterogeneous engine keeps that model and only swaps nn.Linear
modules). Greedy decoding matches transformers' `model.generate(do_sample=False)` token for
token. Shapes: B = 1 (batch), T = prompt tokens, V = vocabulary.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.shapes.spec import check_context
from hetegen_cli.run.text import (  # noqa: F401  (prepare_prompt and the rest: imported from here too)
    GenerationResult,
    GenerationTimings,
    IncrementalDecoder,
    SamplingOptions,
    StopCheck,
    TextCallback,
    TextStream,
    context_limit,
    eos_token_ids,
    generation_result,
    non_finite_logits,
    prepare_prompt,
)

# ---------------------------------------------------------------------------- the decode loop


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def select_token(logits: Any, sampling: SamplingOptions, generator: Any = None) -> int:
    """Next token from last-position logits [V]: argmax, or temperature/top-k/top-p sampling.

    Sampling runs on the CPU in float64 with `generator`, so a seed gives the same tokens on
    any device for the same logits. ModelError when the logits are not finite.
    """
    import torch

    if sampling.greedy:
        if logits.dtype is torch.float32 and logits.device.type == "cpu" and logits.is_contiguous():
            token = int(logits.numpy().argmax())  # the same first maximum (or NaN), ~10x faster than torch's
        else:
            token = int(torch.argmax(logits).item())
        if not math.isfinite(float(logits[token])):  # argmax picks a NaN where there is one
            raise non_finite_logits()
        return token
    scores = logits.detach().double().cpu()  # [V]
    top = scores.max()
    if not torch.isfinite(top):
        raise non_finite_logits()
    # shift before dividing: every score <= 0, so a tiny temperature gives -inf, never NaN
    scores = (scores - top) / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= sampling.top_p  # keep >= 1
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingOptions = SamplingOptions(),
    eos_ids: set[int] | None = None,
    on_text: TextCallback | None = None,
    sync: Callable[[], None] | None = None,
    device: Any = None,
    should_stop: StopCheck | None = None,
) -> GenerationResult:
    """Prefill `prompt_ids` in one forward, then decode one token per step with a KV cache.

    `on_text` receives each new piece of text as soon as it is complete. `sync` (e.g.
    Backend.synchronize) is called before every clock read so GPU timings are real. `device`
    is where the input ids go (default: the device of the model's first parameter).
    `should_stop` is asked after every token (a client gone, a stop string seen): a reason
    ends generation there with that stop_reason.
    """
    import torch

    sampling.validate()
    check_context(len(prompt_ids), max_new_tokens, context_limit(getattr(model, "config", None)))
    sync = sync or (lambda: None)

    def now() -> float:
        sync()
        return time.perf_counter()

    if device is None:
        device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
    cache_kw = cache_keyword(model)
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device="cpu")
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()  # non-deterministic, leaves torch's global RNG alone
    stream = TextStream(tokenizer, eos, on_text)
    cache = new_cache(model, capacity=len(prompt_ids) + max_new_tokens)
    tokens: list[int] = []
    decode_s = 0.0
    stop_reason = "length"

    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
        start = now()
        out = model(input_ids=input_ids, use_cache=True, **{cache_kw: cache}, **extra)
        prefill_end = now()
        token = select_token(out.logits[0, -1], sampling, generator)  # logits [1, T', V]
        first_token_s = now() - start
        tokens.append(token)
        stream.push(token)
        stopped = should_stop() if should_stop is not None else None
        while token not in eos and len(tokens) < max_new_tokens and stopped is None:
            step_start = now()
            step = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
            out = model(input_ids=step, use_cache=True, **{cache_kw: cache}, **extra)
            token = select_token(out.logits[0, -1], sampling, generator)
            decode_s += now() - step_start
            tokens.append(token)
            stream.push(token)
            stopped = should_stop() if should_stop is not None else None
        total_s = now() - start
    if tokens[-1] in eos:
        stop_reason = "eos"
    elif stopped is not None:
        stop_reason = stopped
    stream.close()
    return generation_result(
        prompt_ids, tokens, tokenizer.decode(tokens, skip_special_tokens=True), stop_reason,
        prefill_s=prefill_end - start, first_token_s=first_token_s, decode_s=decode_s, total_s=total_s,
    )  # fmt: skip
