"""Token-count parsing shared by `lminf eval` and `lminf bench`."""

from __future__ import annotations

import pytest

from lminf_cli.errors import UsageError
from lminf_cli.units import format_length, parse_length, parse_lengths


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("4k", 4096), ("4K", 4096), ("128k", 131072), ("128K", 131072), ("1M", 1048576),
    ("1m", 1048576), ("1.5k", 1536), (" 2k ", 2048), ("1", 1), ("0.5k", 512),
])
def test_parse_length(text, value):
    assert parse_length(text) == value


@pytest.mark.parametrize("text", ["", "k", "4kb", "-4k", "0", "0k", "4 k k", "1.3", "1.0001k", "four", "4e3", "4g"])
def test_parse_length_rejects(text):
    with pytest.raises(UsageError) as err:
        parse_length(text, "--max-length")
    assert "--max-length" in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_lengths_keeps_order_drops_duplicates():
    assert parse_lengths("4k,8k,16k,32k") == [4096, 8192, 16384, 32768]
    assert parse_lengths("8k, 2048 ,8192") == [8192, 2048]
    assert parse_lengths("1M") == [1048576]


@pytest.mark.parametrize("text", ["", ",", "4k,", ",4k", "4k,,8k", "4k,eight"])
def test_parse_lengths_rejects(text):
    with pytest.raises(UsageError):
        parse_lengths(text)


@pytest.mark.parametrize("n", [1, 1000, 1024, 1536, 4096, 131072, 1048576, 3 * 1048576 // 2])
def test_format_length_round_trips(n):
    assert parse_length(format_length(n)) == n
    assert format_length(4096) == "4k" and format_length(131072) == "128k" and format_length(1048576) == "1M"
