"""Stop strings over streamed pieces: the emitted text is the text up to the first stop
string, however the text is cut into pieces."""

from __future__ import annotations

import itertools

import pytest

from hetegen_cli.serve.stops import StopText

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    s = StopText(stops)
    out = [s.push(p) for p in pieces]
    out.append(s.flush())
    return "".join(out), s.hit, out


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    """Character by character: cut at the first position where a stop string ends."""
    for end in range(1, len(text) + 1):
        ending = [x for x in stops if x and text[:end].endswith(x)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def test_examples():
    assert run(["Hel", "lo wo", "rld"], ["o w"]) == ("Hell", True, ["Hel", "l", "", ""])
    assert run(["abc"], []) == ("abc", False, ["abc", ""])
    assert run(["a", "b"], ["bc"]) == ("ab", False, ["a", "", "b"])  # "b" held until the end
    assert run(["x\n\n", "y"], ["\n\n", "y"]) == ("x", True, ["x", "", ""])
    # the stop that completes first wins, however the text is cut
    assert run(["a\n", "a"], ["\n", "a\na"])[:2] == run(["a\na"], ["\n", "a\na"])[:2] == ("a", True)


@settings(max_examples=1000, deadline=None)
@given(
    text=st.text(alphabet="ab\nc ", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stops=st.lists(st.text(alphabet="ab\nc ", min_size=1, max_size=4), max_size=4),
)
def test_any_cut_gives_the_text_before_the_first_stop(text, cuts, stops):
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    got, hit, _ = run(pieces, stops)
    assert (got, hit) == expected(text, stops)
    # nothing emitted ever contains a stop string, even across pieces
    assert not any(x in got for x in stops)
