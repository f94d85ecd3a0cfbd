"""Memory probes: the one place lminf reads how much memory there is and how much it used.

On CUDA: the allocator's free bytes and peak allocation.  On the CPU: the kernel's
MemAvailable and this process's peak resident set size (VmHWM, resettable on Linux).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from .errors import UsageError
from .units import human_bytes


def available_bytes(device: torch.device) -> int | None:
    """Free device memory: CUDA's free bytes, or the kernel's MemAvailable on CPU (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory since `reset()` (or since the process started): CUDA max allocated, or peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        """Forget earlier peaks (model loading) so only what follows counts."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):  # Linux: "5" resets this process's peak RSS (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        """Peak bytes since the last reset."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device) -> int:
    """Peak memory of this process on `device` (see PeakMemory)."""
    return PeakMemory(device).read()


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse, before allocating, `nbytes` of `what` that cannot fit in the device's free memory."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise UsageError(f"{what} needs {human_bytes(nbytes)}, but only {human_bytes(free)} of memory is free")
