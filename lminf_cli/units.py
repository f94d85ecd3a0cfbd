"""Token counts written the way people write them: 4096, 32k, 128K, 1M."""

from __future__ import annotations

import re

from .errors import UsageError

_SUFFIX = {"": 1, "k": 1024, "m": 1024 * 1024}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str) -> int:
    """'32k' -> 32768 (k = 1024, M = 1024^2); a positive whole number of tokens."""
    m = _PATTERN.match(text)
    if not m:
        raise UsageError(f"cannot read '{text}' as a length (use e.g. 4096, 32k, 128K or 1M)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value != int(value) or value <= 0:
        raise UsageError(f"length '{text}' must be a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """'8k,32k' -> [8192, 32768]; order kept, duplicates removed."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise UsageError("no length given (use e.g. 32k or 8k,32k,128k)")
    out: list[int] = []
    for p in parts:
        n = parse_length(p)
        if n not in out:
            out.append(n)
    return out


def human_tokens(n: int) -> str:
    """32768 -> '32k'; other counts are printed as they are."""
    for unit, size in (("M", 1024 * 1024), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """Bytes in binary units: 1.5 GiB, 388 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
