"""Projections of a few rows (decode steps) on the CPU, nearer memory speed.

A decode step multiplies one row by every weight matrix: a matrix-vector product
that only streams the weights.  For a row-major [out, in] weight PyTorch hands
that to oneMKL's GEMV, which on the project's 2-core EPYC machine reads weights at 8-9 GB/s on
one thread while the memory delivers ~40 GB/s.  Cutting the weight's rows into
a batch of blocks and calling the batched GEMM instead spreads the blocks over
the threads and takes a faster inner kernel: 2.1-3.5x on every SmolLM2 shape on
two threads, 1.5-2.5x on one (measured in docs/benchmarks.md).

The adapters' forwards switch this on (`few_row_projections`); the model's own
HF forward, which the bench and eval use as the unmodified baseline, keeps
plain `F.linear` although its Linear modules share the class below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Up to this many rows the batched form wins on every shape measured; at 8 rows
# oneMKL's GEMM is as fast (and faster on some shapes), so larger blocks keep it.
FEW_ROWS_MAX = 4
# Upper bound on the blocks one weight is cut into (a power of two).
MAX_SPLITS = 64

_ACTIVE: ContextVar[bool] = ContextVar("lminf_few_row_projections", default=False)


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
        if (_ACTIVE.get() and w.device.type == "cpu" and w.dtype == torch.float32 and x.dtype == w.dtype
                and w.is_contiguous() and x.shape[-1] == self.in_features
                and x.numel() <= FEW_ROWS_MAX * self.in_features
                and not (torch.is_grad_enabled() and w.requires_grad)):
            s = splits_for(self.out_features, torch.get_num_threads())
            if s > 1:
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


@contextmanager
def few_row_projections() -> Iterator[None]:
    """Within this block, FewRowLinear modules use the batched few-row kernel."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
