"""Memory probes: the one place lminf reads how much memory is free and how much it used.

Asking torch for 768 GB fails with a RuntimeError (or, on Linux with overcommit,
gets the process killed later); a size computed from the options can be checked
first and refused with one line that says what did not fit and how much is free.
Peak use: CUDA's peak allocation, or this process's peak resident set size (VmHWM,
resettable on Linux).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .units import human_bytes

_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_bytes(device: Any) -> int | None:
    """Free memory on a device: CUDA's free bytes, else what the kernel (and a container limit) leaves; None if unknown.

    `device` is a torch.device or anything torch.device() accepts.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):  # no driver, or a device index that does not exist
            return None
    if dev.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_room()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo: free memory plus what the kernel can reclaim (Linux only)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup: a container may allow less than the host has."""
    for limit_file, usage_file in _CGROUP_FILES:
        with contextlib.suppress(OSError, ValueError):
            with open(limit_file) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # cgroup v1 writes a huge number for "no limit"
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
    return None


def check_fits(nbytes: int, device: Any, what: str, hint: str = "") -> None:
    """Refuse (UsageError) to allocate `nbytes` on `device` when less than that is free.

    `what` names the allocation, `hint` how to make it smaller; unknown free memory lets it through.
    """
    free = available_bytes(device)
    if free is not None and nbytes > free:
        where = "GPU" if str(device).startswith("cuda") else "host"
        raise UsageError(f"{what} needs {human_bytes(nbytes)} but only {human_bytes(free)} of {where} memory "
                         f"is free" + (f"; {hint}" if hint else ""))


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, dtype: Any) -> int:
    """Bytes of keys and values for `tokens` slots in every layer: 2 x layers x heads x tokens x head_dim x size."""
    return 2 * n_layers * n_kv_heads * tokens * head_dim * torch.empty(0, dtype=dtype).element_size()


def release_free_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system.

    Why: loading a model frees a few hundred MB of temporaries (GGUF de-quantization, float32
    copies before packing) that glibc's allocator keeps in the process; the resident set then
    stays that much larger for the whole session.  malloc_trim returns what it can (glibc
    only: elsewhere this is a no-op).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        name = ctypes.util.find_library("c")
        if name:
            ctypes.CDLL(name).malloc_trim(0)


class PeakMemory:
    """Peak memory since `reset()` (or since the process started): CUDA max allocated, or peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        """Forget earlier peaks (model loading) so only what follows counts; on the CPU, memory
        already freed is handed back first (release_free_memory), as lminf does after loading."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        release_free_memory()
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
