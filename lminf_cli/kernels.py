"""Projections of a few rows (decode steps) on the CPU, nearer memory speed, where that holds.

A decode step multiplies one row by every weight matrix: a matrix-vector product
that only streams the weights.  For a row-major [out, in] weight PyTorch hands
that to oneMKL's GEMV, which on the project's 2-core EPYC machine reads weights at 8-9 GB/s on
one thread while the memory delivers ~40 GB/s.  Cutting the weight's rows into
a batch of blocks and calling the batched GEMM instead spreads the blocks over
the threads and takes a faster inner kernel: 2.1-3.5x on every SmolLM2 shape on
two threads, 1.5-2.5x on one (measured in docs/benchmarks.md).

It is not faster everywhere: on an Intel Xeon with AMX, oneMKL's float32 GEMV already
reads at the memory's speed and the batched form is 2.2-2.7x *slower*; in bfloat16 it
won on the LM head there and lost on small shapes.  No rule by vendor or dtype held, so
each machine decides once by measuring both forms (`few_row_verdict`), per dtype and
thread count, and keeps the verdict in a small file (`verdict_path`).

The adapters' forwards switch this on (`few_row_projections`); the model's own
HF forward, which the bench and eval use as the unmodified baseline, keeps
plain `F.linear` although its Linear modules share the class below.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Up to this many rows the batched form wins on every shape measured; at 8 rows
# oneMKL's GEMM is as fast (and faster on some shapes), so larger blocks keep it.
FEW_ROWS_MAX = 4
# Upper bound on the blocks one weight is cut into (a power of two).
MAX_SPLITS = 64

_ACTIVE: ContextVar[bool] = ContextVar("lminf_few_row_projections", default=False)

# Weight dtypes the batched form can take (bmm runs both on the CPU); each gets its own verdict.
FEW_ROW_DTYPES = (torch.float32, torch.bfloat16)
# $LMINF_FEW_ROW: "auto" (measure once per machine, the default), "on" or "off" (force it).
FEW_ROW_ENV = "LMINF_FEW_ROW"
VERDICT_FILE = "few_row_kernel.json"
# The batched form must beat F.linear by this factor on every measured shape to be used: timings
# on a busy machine wobble by a few percent, and "never slower" matters more than a small gain.
FEW_ROW_MARGIN = 0.9
# Shapes timed by the measurement: a wide matrix (MLP/LM-head-like, 16 MiB in float32: larger than
# any per-core cache, so it streams as a decode step's weights do) and a square one (attention
# projections).  Both forms run first, unmeasured, and must agree.
MEASURE_SHAPES = ((4096, 1024), (1024, 1024))
MEASURE_REPEATS = 7
# (dtype, threads) -> verdict, for this process.
_VERDICTS: dict[tuple[torch.dtype, int], bool] = {}


def splits_for(out_features: int, threads: int) -> int:
    """How many row blocks to cut an [out, in] weight into: a power of two of about
    4 blocks per thread (so every thread has work) that divides `out_features`;
    1 means no cut is possible and the plain kernel runs."""
    s = 1
    while s < min(4 * max(threads, 1), MAX_SPLITS):
        s *= 2
    while s > 1 and out_features % s:
        s //= 2
    return s


def few_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None, splits: int) -> Tensor:
    """x [..., in] @ weight[out, in].T + bias as one batched GEMM over `splits` row blocks
    of the weight.  Meant for a few rows: each block is read once per call."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)                             # [M, in]
    blocks = weight.view(splits, out_features // splits, in_features)  # [S, out/S, in]
    # [S, in, M], no copy.  The strides matter: these, (0, 1, in), take oneMKL's fast path;
    # x.reshape(1, in, 1).expand(...), the same values for M = 1, measured 2.8x slower.
    cols = rows.T.expand(splits, in_features, rows.shape[0])
    y = torch.bmm(blocks, cols).view(out_features, rows.shape[0]).T  # [M, out]
    if bias is not None:
        y = y + bias
    # [M, out] is a transposed view for M > 1: return F.linear's contiguous layout, which
    # the adapters' reshapes and kernels downstream were written against.
    return y.reshape(*x.shape[:-1], out_features).contiguous()   # [..., out]


class FewRowLinear(nn.Linear):
    """nn.Linear whose few-row products take `few_row_linear` inside `few_row_projections`.

    The class of an existing Linear is swapped in place (`install`): parameters,
    state dict and hooks are untouched.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (_ACTIVE.get() and w.device.type == "cpu" and w.dtype in FEW_ROW_DTYPES and x.dtype == w.dtype
                and w.is_contiguous() and x.shape[-1] == self.in_features
                and x.numel() <= FEW_ROWS_MAX * self.in_features
                and not (torch.is_grad_enabled() and w.requires_grad)):
            threads = torch.get_num_threads()
            s = splits_for(self.out_features, threads)
            if s > 1 and few_row_enabled(w.dtype, threads):
                return few_row_linear(x, w, self.bias, s)
        return F.linear(x, w, self.bias)


def install(model: nn.Module) -> int:
    """Give every plain nn.Linear of `model` the few-row path; returns how many.

    Subclasses of nn.Linear (quantized or family-specific layers) keep their
    own forward.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
            n += 1
    return n


def few_row_enabled(dtype: torch.dtype, threads: int) -> bool:
    """Whether the batched form is faster than F.linear for `dtype` weights on `threads` threads
    here: $LMINF_FEW_ROW when it says on/off, else this machine's verdict (measured once)."""
    mode = os.environ.get(FEW_ROW_ENV, "auto")  # read every call (~0.2 us): a test or a user may flip it
    if mode in ("on", "off"):
        return mode == "on"
    key = (dtype, threads)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _VERDICTS[key] = few_row_verdict(dtype, threads)
    return verdict


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def verdict_key(dtype: torch.dtype, threads: int) -> str:
    """What a verdict depends on: the CPU model, the torch build (its oneMKL/oneDNN), the thread
    count and the dtype."""
    return f"{cpu_name()} | torch {torch.__version__} | {threads} threads | {str(dtype).removeprefix('torch.')}"


def verdict_path() -> Path:
    """The file that keeps each machine's verdicts: delete it (or one entry) to measure again."""
    from .models import cache_dir  # models imports this module: resolve at call time

    return cache_dir() / VERDICT_FILE


def few_row_verdict(dtype: torch.dtype, threads: int) -> bool:
    """The verdict kept for this machine, or a new measurement (then kept, if the cache is writable)."""
    key = verdict_key(dtype, threads)
    path = verdict_path()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("enabled"), bool):
        return entry["enabled"]
    ratio = measure_few_row(dtype, threads)
    enabled = ratio < FEW_ROW_MARGIN
    known = known if isinstance(known, dict) else {}
    known[key] = {"enabled": enabled, "ratio": round(ratio, 3)}
    with suppress(OSError):  # an unwritable cache only means measuring again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return enabled


def measure_few_row(dtype: torch.dtype, threads: int, shapes=MEASURE_SHAPES, repeats: int = MEASURE_REPEATS) -> float:
    """Time of the batched form over F.linear's for one row, the worst over `shapes` (< 1: faster).

    Each shape is timed with the two forms interleaved and the order alternating, and the
    fastest of `repeats` runs of each kept: a busy machine only ever adds time, so the
    minimum is the least disturbed reading.  Both forms run once first and must agree
    (within the dtype's rounding); if they do not, the batched form is not used.  Takes 0.1-0.5 s,
    once per machine, dtype and thread count.
    """
    worst = 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            for out_features, in_features in shapes:
                w = torch.randn(out_features, in_features, generator=g).to(dtype)
                x = torch.randn(1, 1, in_features, generator=g).to(dtype)
                s = splits_for(out_features, threads)
                if s == 1:
                    return float("inf")
                ref, few = F.linear(x, w), few_row_linear(x, w, None, s)
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                if not torch.allclose(few.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item()):
                    return float("inf")
                forms = [lambda w=w, x=x: F.linear(x, w), lambda w=w, x=x, s=s: few_row_linear(x, w, None, s)]
                best = [float("inf"), float("inf")]
                for r in range(repeats):
                    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                        t0 = time.perf_counter()
                        forms[i]()
                        best[i] = min(best[i], time.perf_counter() - t0)
                worst = max(worst, best[1] / best[0])
    finally:
        torch.set_num_threads(before)
    return worst


@contextmanager
def few_row_projections() -> Iterator[None]:
    """Within this block, FewRowLinear modules use the batched few-row kernel."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# CPU features under which bfloat16 GEMMs run natively (oneDNN picks them): AMX tiles (Sapphire Rapids
# and later) or AVX-512 BF16 dot products (Cooper Lake, AMD Zen 4).  Without them bfloat16 is emulated
# on the CPU and slower than float32.
BF16_FEATURES = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The CPU feature that makes bfloat16 faster than float32 here ('amx_bf16', 'avx512_bf16'), or None.

    The one probe behind `--dtype auto` on the CPU (tests replace it).  oneDNN, which runs the
    bfloat16 kernels, must be built into torch.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    return bf16_feature(_torch_cpu_flags() or _cpuinfo_flags())


def bf16_feature(flags: set[str]) -> str | None:
    """The first of BF16_FEATURES among a CPU's feature flags."""
    return next((f for f in BF16_FEATURES if f in flags), None)


def _torch_cpu_flags() -> set[str]:
    """torch's own CPU feature table (torch.cpu.get_capabilities, torch >= 2.9: cpuinfo's detection,
    the same that picks torch's kernels), as the set of features present; empty if unavailable."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:
        return set()
    try:
        return {name for name, value in caps().items() if value is True}
    except (RuntimeError, AttributeError, TypeError):
        return set()


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The kernel's flags line (Linux), for torch builds without get_capabilities; empty elsewhere."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
