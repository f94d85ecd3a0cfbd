"""Token counts as people write them: 4096, 4k, 128K, 1.5k, 1M, and comma lists.

k and M are binary (4k = 4096 tokens), as context lengths are usually quoted.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2}
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(s: str, name: str = "length", allow_zero: bool = False) -> int:
    """'4096', '4k', '128K', '1M', '1.5k' -> a positive number of tokens (or zero, if allowed).

    `name` (e.g. '--max-length') goes into the error message.
    """
    m = _LENGTH.match(str(s))
    if not m:
        raise UsageError(f"{name}: cannot read '{s}' as a number of tokens (e.g. 4096, 4k, 128K, 1M)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value != int(value):
        raise UsageError(f"{name}: '{s}' is not a whole number of tokens")
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name}: must be a positive number of tokens, got '{s}'")
    return int(value)


def parse_lengths(s: str, name: str = "lengths") -> list[int]:
    """'4k,8k,16k' -> [4096, 8192, 16384] (order kept, duplicates dropped)."""
    parts = [p for p in str(s).split(",")]
    if not s or not str(s).strip() or any(not p.strip() for p in parts):
        raise UsageError(f"{name}: expected a comma-separated list of lengths (e.g. 4k,8k,16k), got '{s}'")
    out: list[int] = []
    for p in parts:
        v = parse_length(p, name)
        if v not in out:
            out.append(v)
    return out


def format_length(n: int) -> str:
    """4096 -> '4k', 131072 -> '128k', 1536 -> '1.5k', 1000 -> '1000'."""
    for unit, size in (("M", 1024 ** 2), ("k", 1024)):
        if n >= size and (n * 2) % size == 0:
            v = n / size
            return f"{v:g}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """Bytes in binary units: 388 MiB, 1.52 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
