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
from dataclasses import asdict, dataclass, field
from typing import Any

from hetegen_cli.core.errors import InputError, ModelError, UsageError
from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.shapes.spec import check_context

TextCallback = Callable[[str], None]
StopCheck = Callable[[], str | None]  # a reason to stop now (e.g. "cancelled"), or None


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """UsageError for values outside their ranges (docs/validation.md)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(
                f"--temperature {self.temperature} is not a finite number of 0 or more",
                "use 0 for greedy decoding or a positive value such as 0.7",
            )
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p {self.top_p} is outside (0, 1]", "use e.g. --top-p 0.9")
        if not 0 <= self.top_k <= 2**31:
            raise UsageError(f"--top-k {self.top_k} is outside [0, 2^31]", "use 0 (off) or e.g. --top-k 50")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UsageError(f"--seed {self.seed} is outside [0, 2^64)", "use e.g. --seed 42")


@dataclass(frozen=True)
class GenerationTimings:
    """Seconds measured with a synchronising clock.

    prefill_s: the one forward over the prompt. time_to_first_token_s: from the start of
    generation to the first generated token (prefill + sampling). decode_s: the remaining
    `decode_steps` one-token forwards (+ sampling), excluding the text callback.
    """

    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_steps: int
    total_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        doc["decode_tokens_per_s"] = self.decode_tokens_per_s
        return doc


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (an EOS that stopped it included)
    text: str  # decoded generated tokens, special tokens skipped
    stop_reason: str  # "eos", "length", or what should_stop returned (e.g. "stop", "cancelled")
    timings: GenerationTimings
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- prompt handling


def prepare_prompt(tokenizer: Any, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of `prompt`: plain text, or a one-turn chat with the generation prompt."""
    if prompt is None or not prompt.strip():
        raise UsageError("the prompt is empty", 'pass some text, e.g. --prompt "The capital of France is"')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = prompt.encode("utf-8", "surrogateescape")
        raise UsageError(
            f"the prompt is not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} at position {exc.start})",
            "pass the prompt as UTF-8 text",
        ) from None
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "this model's tokenizer has no chat template, so --chat cannot be used",
                "drop --chat to send the prompt as plain text",
            )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding on some versions
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise InputError("the prompt produced no tokens", "pass some text")
    return ids


def context_limit(config: Any) -> int | None:
    """Maximum positions the model supports (config.max_position_embeddings), if known."""
    value = getattr(config, "max_position_embeddings", None)
    if value is None and isinstance(config, dict):
        value = config.get("max_position_embeddings")
    return int(value) if value else None


def eos_token_ids(model: Any, tokenizer: Any = None) -> set[int]:
    """All end-of-sequence ids of the generation config and the model config."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    if not ids and tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# ---------------------------------------------------------------------------- streaming text


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without breaking UTF-8 characters.

    Decodes a small window (the previous piece + new tokens) and emits only the new suffix,
    holding back text that ends in an incomplete multi-byte character.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (maybe '')."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


# ---------------------------------------------------------------------------- the decode loop


def _supports_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _non_finite() -> ModelError:
    return ModelError(
        "the model produced logits that are NaN or infinite",
        "the weights may be damaged or overflow in this dtype; try --dtype float32",
    )


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
            raise _non_finite()
        return token
    scores = logits.detach().double().cpu()  # [V]
    top = scores.max()
    if not torch.isfinite(top):
        raise _non_finite()
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
    decoder = IncrementalDecoder(tokenizer)
    cache = new_cache(model, capacity=len(prompt_ids) + max_new_tokens)
    tokens: list[int] = []
    decode_s = 0.0
    stop_reason = "length"

    def emit(token: int) -> None:
        piece = decoder.push(token) if token not in eos else ""
        if piece and on_text is not None:
            on_text(piece)

    with torch.inference_mode():
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
        start = now()
        out = model(input_ids=input_ids, use_cache=True, **{cache_kw: cache}, **extra)
        prefill_end = now()
        token = select_token(out.logits[0, -1], sampling, generator)  # logits [1, T', V]
        first_token_s = now() - start
        tokens.append(token)
        emit(token)
        stopped = should_stop() if should_stop is not None else None
        while token not in eos and len(tokens) < max_new_tokens and stopped is None:
            step_start = now()
            step = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
            out = model(input_ids=step, use_cache=True, **{cache_kw: cache}, **extra)
            token = select_token(out.logits[0, -1], sampling, generator)
            decode_s += now() - step_start
            tokens.append(token)
            emit(token)
            stopped = should_stop() if should_stop is not None else None
        total_s = now() - start
    if tokens[-1] in eos:
        stop_reason = "eos"
    elif stopped is not None:
        stop_reason = stopped
    tail = decoder.flush()
    if tail and on_text is not None:
        on_text(tail)
    timings = GenerationTimings(
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(tokens),
        prefill_s=prefill_end - start,
        time_to_first_token_s=first_token_s,
        decode_s=decode_s,
        decode_steps=len(tokens) - 1,
        total_s=total_s,
    )
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(
        prompt_token_ids=list(prompt_ids),
        token_ids=tokens,
        text=text,
        stop_reason=stop_reason,
        timings=timings,
    )
