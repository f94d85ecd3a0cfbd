"""Encode speed measured on this machine, kept between runs to say how long a long encode will take.

One small JSON file in the lminf cache dir maps "model | device | dtype" to tokens
per second, updated after each encode long enough to measure.  It is a hint only:
an unreadable or damaged file counts as no record, and a failed write is ignored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

from .models import cache_dir

SPEED_FILE = "encode-speed.json"
MIN_SECONDS = 2.0   # shorter encodes are too noisy (and too short to matter) to record
MAX_ENTRIES = 64    # oldest records go first


def speed_key(lm: Any) -> str:
    """What the speed depends on most: the model, the device type, the dtype and any quantization."""
    mode = getattr(lm, "quantize", "none")
    quantized = "" if mode == "none" else f"+{mode}"
    return f"{lm.name}|{lm.device.type}|{str(lm.dtype).removeprefix('torch.')}{quantized}"


def _read() -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError, RecursionError):
        path = cache_dir() / SPEED_FILE
        if path.stat().st_size > 1 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return {str(k): float(v) for k, v in data.items()
                    if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
    return {}


def recorded_speed(key: str) -> float | None:
    """Tokens per second last measured for this key, or None."""
    return _read().get(key)


def record_speed(key: str, tokens: int, seconds: float) -> None:
    """Remember an encode's speed (when it ran long enough to say something); never fails."""
    if seconds < MIN_SECONDS or tokens <= 0:
        return
    data = _read()
    data.pop(key, None)  # re-inserted last: the newest record survives the trim
    data[key] = round(tokens / seconds, 1)
    while len(data) > MAX_ENTRIES:
        data.pop(next(iter(data)))
    with contextlib.suppress(OSError):
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".speed-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, folder / SPEED_FILE)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def format_duration(seconds: float) -> str:
    """41 s, 3 min 20 s, 2 h 05 min."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
