"""Sizes: parsing "6GiB" into bytes and formatting bytes back."""

from __future__ import annotations

import pytest

from hetegen_cli.core.errors import InputError
from hetegen_cli.core.units import format_bytes, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1048576", 2**20), ("0.5 GB", 5 * 10**8), ("0", 0)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["six gigs", "4 parsecs", "-1GiB", ""])
def test_parse_size_rejects_bad_text(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"
