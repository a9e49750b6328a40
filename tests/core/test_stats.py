"""The one statistics helper."""

from __future__ import annotations

import pytest

from hetegen_cli.core.stats import ratio, summarize


def test_summarize_on_known_samples():
    assert summarize([1.0, 2.0, 3.0]) == {
        "mean": 2.0,
        "sd": 1.0,
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "n": 3,
        "samples": [1.0, 2.0, 3.0],
    }
    one = summarize([0.5])
    assert one["sd"] == 0.0 and one["median"] == 0.5 and one["n"] == 1
    assert summarize([4.0, 1.0, 3.0, 2.0])["median"] == 2.5
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_is_none_when_undefined():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0) is None
