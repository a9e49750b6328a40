"""Text around generation, without torch: sampling options, timings and results, the
prompt's tokens, streaming text pieces (run.generate runs the model with these; run.direct
too, in a process that never imports torch)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hetegen_cli.core.errors import InputError, ModelError, UsageError

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


class TextStream:
    """The generated tokens' text as it completes: `push(token)` hands each new piece to
    `on_text` (an end-of-sequence token adds none), `close()` the held-back rest."""

    def __init__(self, tokenizer: Any, eos: set[int], on_text: TextCallback | None) -> None:
        self.decoder, self.eos, self.on_text = IncrementalDecoder(tokenizer), eos, on_text

    def push(self, token: int) -> None:
        piece = self.decoder.push(token) if token not in self.eos else ""
        if piece and self.on_text is not None:
            self.on_text(piece)

    def close(self) -> None:
        tail = self.decoder.flush()
        if tail and self.on_text is not None:
            self.on_text(tail)


def generation_result(
    prompt_ids: list[int], tokens: list[int], text: str, stop_reason: str, *, prefill_s: float,
    first_token_s: float, decode_s: float, total_s: float,
) -> GenerationResult:  # fmt: skip
    """The result of a generation whose first token came from the prefill (decode steps:
    one fewer than the tokens)."""
    timings = GenerationTimings(
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(tokens),
        prefill_s=prefill_s,
        time_to_first_token_s=first_token_s,
        decode_s=decode_s,
        decode_steps=len(tokens) - 1,
        total_s=total_s,
    )
    return GenerationResult(list(prompt_ids), tokens, text, stop_reason, timings)


def non_finite_logits(
    hint: str = "the weights may be damaged or overflow in this dtype; try --dtype float32",
) -> ModelError:
    """The error for logits that are NaN or infinite."""
    return ModelError("the model produced logits that are NaN or infinite", hint)
