"""The two phases of generation: prefill (the prompt: many tokens per forward) and decode (one
new token per forward). Plans, predictions, the engine and traces are all per phase."""

from __future__ import annotations

from typing import Literal

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, Phase] = ("prefill", "decode")
