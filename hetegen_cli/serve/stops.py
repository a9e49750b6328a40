"""Stop strings over streamed text (pure Python).

OpenAI's `stop`: generation ends as soon as a stop string has been generated, and the returned
text excludes it. "First" means first complete: reading the text one character at a time, the
earliest position where some stop string ends. Pieces arrive a token at a time, so text that
could still become a stop string is held back until it cannot; a client never sees part of a
stop string, and the result does not depend on how the text was cut into pieces.
"""

from __future__ import annotations


class StopText:
    """Feed text pieces with `push`; it returns what is safe to emit and sets `hit` at the
    first stop string (everything after it is dropped). `flush` returns what was held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        # the stop string that is complete first (earliest end; on a tie the longer one), as if
        # the text had come one character at a time: the result never depends on how the
        # text was cut into pieces
        found = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            _, start = min(found)
            out, self.pending, self.hit = self.pending[:start], "", True
            return out
        hold = self._held_back()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def _held_back(self) -> int:
        """Length of the longest end of `pending` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """The held-back text at the end of generation (none after a stop string)."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out
