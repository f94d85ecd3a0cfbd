"""Weight-only int8 / int4 linear layers for CPU decode steps (`--quantize`).

A decode step multiplies one row by every weight matrix, so its time is the weights' bytes.
PyTorch ships two weight-only CPU kernels for that, used here as they are (no extra package):

* int4: `aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)`, asymmetric groups
  of 32 input columns, w = (q - 8) * scale + zero with q in 0..15;
* int8: `aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`, one scale per output row.

Both want bfloat16 activations: with float32 ones they fall to a scalar path 2-25x slower than
float32's GEMV (measured on an AMX Xeon), so the quantized product always runs in bfloat16 and
casts back.  On that machine, at one row on SmolLM2-135M's shapes, int4 took 0.26-0.5x the time
of float32's F.linear (LM head, MLP, q/o) and int8 0.45-0.7x; on the small k/v shapes both were
about as fast as float32.

They are GEMV kernels: at 512 rows (a prefill chunk) both ran 2x slower than float32 and 10x
slower than bfloat16 on AMX.  So a `QuantizedLinear` keeps its dense weight too and uses the
quantized copy only for a few rows (kernels.FEW_ROWS_MAX); prefill multiplies by the dense
weight.  The dense weight stays the module's parameter: state dict, tied embeddings and the
model's fingerprint do not change.

`--quantize int4` puts the block projections in int4 and the LM head in int8: the embedded
GGUF's blocks are Q4_1 (groups of 32, w = d * q + m), which int4 groups of 32 describe with the
same d, m and q (only d and m round to bfloat16, as the kernel takes its scales in the
activations' dtype), while its tied head/embedding is Q8_0, which 4 bits would degrade.  Measured
over 32k tokens of text: +0.0024 nats of mean NLL against float32 (int4 blocks, int8 head), and
+0.0101 for int8 everywhere (per-row int8 re-quantizes the Q4_1 groups).

Packing takes seconds for a large model; `load_model` keeps the packed tensors in a safetensors
file under cache_dir()/quantized, keyed by the source files, the mode and the torch version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import kernels
from .errors import UsageError

MODES = ("none", "int8", "int4")
GROUP = 32           # int4 group size (the embedded GGUF's Q4_1 blocks); int8 needs K % GROUP too
INT4_N_MULTIPLE = 16  # the int4 packing wants out_features % 16 == 0
INNER_K_TILES = 2
ACT_DTYPE = torch.bfloat16
# Bump when what is stored (names, layout, rounding) changes: old cache files are then ignored.
FORMAT = 1


def check_mode(mode: str | None) -> str:
    """'none', 'int8' or 'int4' (None and '' mean none); anything else is a usage error."""
    m = (mode or "none").strip().lower()
    if m not in MODES:
        raise UsageError(f"unknown --quantize '{mode}' (use none, int8 or int4)")
    return m


def kernels_available() -> bool:
    """Whether this torch has both weight-only CPU kernels."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu",
                                               "_weight_int8pack_mm"))


def pack_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (packed uint8, scales_and_zeros [K / GROUP, N, 2] bfloat16) for the int4 kernel.

    Min/max per group: scale = (max - min) / 15, zero = min + 8 * scale.  Scale and zero are
    rounded to bfloat16 first and q is chosen against the rounded values, so the rounding of
    the scales is not added on top of the rounding of q.
    """
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)                                           # [N, K / g]
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(ACT_DTYPE)
    zero = (lo + 8 * scale.float()).to(ACT_DTYPE)
    q = ((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(n, k), INNER_K_TILES)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()       # [K / g, N, 2]
    return packed, sz


def int8_rows(x: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of every row (last dim) of x: x [..., K] -> (q int8 [..., K], scale [...]) with
    x ~ q * scale, scale = max|row| / 127 in `scale_dtype`.

    The one int8 rounding of the project: weights (one row per output feature), the window's keys and
    values (one row per token and head, ring.Int8Ring) and the middle store's.  The scale is rounded to
    its dtype first and q chosen against the rounded scale, so the two roundings do not add up; q is
    clamped because a scale rounded down would put the largest element at 127.5.
    """
    # A decode step rounds a few rows a layer, so every operation's dispatch counts: conversions
    # only where the dtype changes, in-place where a temporary is ours.
    x = x.detach() if x.requires_grad else x  # (weights)
    xf = x if x.dtype == torch.float32 else x.float()
    scale = xf.abs().amax(-1, keepdim=True).mul_(1 / 127).clamp_(min=1e-12)                 # [..., 1]
    if scale_dtype != torch.float32:
        scale = scale.to(scale_dtype)
        q = torch.div(xf, scale.float()).round_().clamp_(-127, 127).to(torch.int8)
    else:  # the scale is exact: the largest element is exactly +-127
        q = torch.div(xf, scale).round_().to(torch.int8)
    return q, scale.squeeze(-1)


def pack_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (int8 [N, K], scales [N] bfloat16): symmetric, one scale per output row."""
    return int8_rows(w, ACT_DTYPE)


def plan(model: nn.Module, mode: str) -> dict[str, str]:
    """Which linear layers get which kind ('int4' or 'int8') under `mode`.

    Every nn.Linear (or its kernels.FewRowLinear form) whose in_features is a multiple of 32
    (both kernels need it); under int4 the LM head and layers whose out_features is not a
    multiple of 16 take int8.  Other layers keep their dense weight.
    """
    if mode == "none":
        return {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = {}
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, kernels.FewRowLinear, QuantizedLinear) or m.in_features % GROUP:
            continue
        kind = mode
        if mode == "int4" and (m is head or m.out_features % INT4_N_MULTIPLE):
            kind = "int8"
        kinds[name] = kind
    return kinds


def quantize_weights(model: nn.Module, mode: str) -> dict[str, Tensor]:
    """The packed tensors of every planned layer, from its weight as it is now (float32 weights
    give the closest result): {'<layer>.qweight': ..., '<layer>.qscales': ...}."""
    out = {}
    for name, kind in plan(model, mode).items():
        w = model.get_submodule(name).weight
        qw, qs = pack_int4(w.cpu()) if kind == "int4" else pack_int8(w.cpu())
        out[f"{name}.qweight"], out[f"{name}.qscales"] = qw, qs
    return out


Layout = tuple[tuple[int, ...], torch.dtype]


def _expected(kind: str, n: int, k: int) -> tuple[Layout, Layout]:
    """(shape, dtype) of a layer's qweight and qscales."""
    if kind == "int4":
        return ((n, k // 2), torch.uint8), ((k // GROUP, n, 2), ACT_DTYPE)
    return ((n, k), torch.int8), ((n,), ACT_DTYPE)


def install(model: nn.Module, mode: str, tensors: Mapping[str, Tensor]) -> int:
    """Turn the planned linear layers of `model` into QuantizedLinear with these packed tensors;
    returns how many.  Checks every tensor's presence, shape and dtype first (a ValueError names
    the first mismatch), so a stale or foreign cache file changes nothing."""
    kinds = plan(model, mode)
    for name, kind in kinds.items():
        m = model.get_submodule(name)
        for suffix, (shape, dtype) in zip(("qweight", "qscales"), _expected(kind, m.out_features, m.in_features),
                                          strict=True):
            t = tensors.get(f"{name}.{suffix}")
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{name}.{suffix}: expected {dtype} {shape}, got {got}")
    for name, kind in kinds.items():
        m = model.get_submodule(name)
        m.__class__ = QuantizedLinear
        m.kind = kind
        # Plain attributes, not buffers: model.to(dtype) must not cast the scales (the kernel takes
        # them in bfloat16), and the state dict stays the dense model's.
        m.qweight, m.qscales = tensors[f"{name}.qweight"].cpu(), tensors[f"{name}.qscales"].cpu()
    return len(kinds)


def quantized_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The packed tensors installed in `model` (what the cache file holds)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            out[f"{name}.qweight"], out[f"{name}.qscales"] = m.qweight, m.qscales
    return out


class QuantizedLinear(nn.Linear):
    """nn.Linear with a weight-only int4/int8 copy for products of a few rows on the CPU.

    Up to kernels.FEW_ROWS_MAX rows (decode steps) it multiplies by the packed copy in bfloat16;
    larger blocks (prefill) and other devices use the dense weight, as nn.Linear does.
    """

    kind: str
    qweight: Tensor
    qscales: Tensor

    def forward(self, x: Tensor) -> Tensor:
        if few_rows(x, self.in_features) and not (torch.is_grad_enabled() and self.weight.requires_grad):
            return packed_product(x, self.kind, self.qweight, self.qscales, self.bias)
        return F.linear(x, self.weight, self.bias)

    def dequantized(self) -> Tensor:
        """The weight the packed copy stands for, [N, K] float32 (what a decode step multiplies by)."""
        if self.kind == "int4":
            # One-hot rows through the kernel, in float32 so that nothing rounds the result.
            eye = torch.eye(self.in_features, dtype=torch.float32)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, GROUP, self.qscales.float()).T
        return self.qweight.float() * self.qscales.float()[:, None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={self.kind}"


class FusedProjection:
    """Quantized linear layers of one input (q/k/v, gate/up) as one kernel call for a few rows.

    A decode step's projections are tiny GEMVs, each kernel call with its own set-up: on SmolLM2-135M
    fusing q/k/v and gate/up made a step 0.96x as long at 2k tokens, 0.97x at 9k (paired,
    scripts/fused_paired.py: 26.5 against 27.7 ms, 36.3 against 37.3).  The
    packed weights of the layers are concatenated along their outputs and, once the fused product
    is checked equal to the layers' (`fuse`), each layer's `qweight` becomes a view of its rows: no
    second copy of the weights.  The int4 kernel's scales [K / 32, N, 2] cannot be viewed per layer
    (the kernel silently misreads non-contiguous scales: measured), so the fused scales are a copy
    (2 * 2 bytes per 32 weights: ~3% of the packed weights).
    """

    def __init__(self, linears: Sequence[QuantizedLinear]) -> None:
        self.kind = linears[0].kind
        self.in_features = linears[0].in_features
        self.layers = list(linears)
        self.sizes = [m.out_features for m in linears]
        self.qweight = torch.cat([m.qweight for m in linears])                              # [sum N, K'] rows
        self.qscales = torch.cat([m.qscales for m in linears], dim=1 if self.kind == "int4" else 0)
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                  for m in linears]
        self.bias = torch.cat([b.detach() for b in biases]) if any(m.bias is not None for m in linears) else None

    def share(self) -> None:
        """Make each layer's packed weight (and int8 scales) a view of the fused ones."""
        start = 0
        for m in self.layers:
            m.qweight = self.qweight[start:start + m.out_features]
            if self.kind == "int8":
                m.qscales = self.qscales[start:start + m.out_features]
            start += m.out_features

    def tensors(self) -> tuple[Tensor, ...]:
        return self.qweight, self.qscales

    def __call__(self, x: Tensor) -> Tensor | None:
        """x [..., K] -> [..., sum N], or None when x is not a few-row CPU product (callers then run
        the separate layers, on their dense weights)."""
        if not few_rows(x, self.in_features):
            return None
        dtype = self.layers[0].weight.dtype
        if self.bias is not None and self.bias.dtype != dtype:  # the model was cast after fusing: as its layers
            self.bias = self.bias.to(dtype)
        return packed_product(x, self.kind, self.qweight, self.qscales, self.bias)


def fuse(linears: Sequence[nn.Module]) -> FusedProjection | None:
    """One FusedProjection for these layers, if they are all QuantizedLinear of one kind and input
    size on the CPU and the fused product equals theirs; else None (nothing changes)."""
    if len(linears) < 2 or not all(type(m) is QuantizedLinear for m in linears):
        return None
    first = linears[0]
    if any(m.kind != first.kind or m.in_features != first.in_features or m.weight.device.type != "cpu"
           for m in linears):
        return None
    fused = FusedProjection(linears)
    # Concatenated packs are not always one pack: the int4 packing lays out outputs in blocks of 64,
    # and a layer of 32 or 96 outputs followed by another gave wrong sums (torch 2.13, measured).  So
    # every fusion is checked on a probe row against the layers themselves, and kept only if equal.
    probe = torch.randn(1, first.in_features, generator=torch.Generator().manual_seed(0)).to(first.weight.dtype)
    with torch.inference_mode():
        if not torch.equal(fused(probe), torch.cat([m(probe) for m in linears], dim=-1)):
            return None
    fused.share()
    return fused


def few_rows(x: Tensor, in_features: int) -> bool:
    """Whether x [..., in_features] is a product for the packed copy: a few rows (a decode step,
    up to kernels.FEW_ROWS_MAX) on the CPU.  Larger blocks (prefill) take the dense weight."""
    return (x.device.type == "cpu" and x.shape[-1] == in_features
            and x.numel() <= kernels.FEW_ROWS_MAX * in_features)


def packed_product(x: Tensor, kind: str, qweight: Tensor, qscales: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] @ a packed weight^T (+ bias) -> [..., N] in x's dtype, the product in bfloat16
    (ACT_DTYPE, the kernels' activation dtype).  Conversions only where the dtype changes: a .to
    that does nothing still costs a dispatch, several a layer in a decode step.  TorchScript
    compiles it too (step_script), so it names bfloat16 itself: scripted code reads no globals."""
    rows = x.reshape(-1, x.shape[-1])                                                     # [M, K]
    if rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16)
    y = packed_matmul(rows, kind, qweight, qscales)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    y = y.view(list(x.shape[:-1]) + [y.shape[-1]])                                        # [..., N]
    return y if bias is None else y + bias


def packed_matmul(rows: Tensor, kind: str, qweight: Tensor, qscales: Tensor, group: int = GROUP) -> Tensor:
    """rows [M, K] bfloat16 @ a packed weight^T -> [M, N] bfloat16: the kernel call alone."""
    if kind == "int4":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, qweight, group, qscales)
    return torch.ops.aten._weight_int8pack_mm(rows, qweight, qscales)


def unique_nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each counted once (views share their base's)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- the cache file

def cache_key(source: str, mode: str) -> str:
    """A file name for the packed tensors of `source` (a description of the source files that
    changes when they do) under `mode` with this torch (its packing layout may change)."""
    h = hashlib.sha256(json.dumps([source, mode, GROUP, FORMAT, torch.__version__]).encode()).hexdigest()[:20]
    return f"{mode}-{h}.safetensors"


def load_cached(path: Path) -> dict[str, Tensor] | None:
    """The tensors of a cache file, or None when it is absent or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        # pread, not the default mmap: tensors of an mmap'd file keep the whole mapping resident until
        # the last of them is freed, so the layers' packs that fusion replaces (adapters) stayed in
        # memory: +35 MB resident on SmolLM2 with int4, +6 MB read into the process's own memory.
        return load_file(str(path), backend="pread")
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None


def save_cached(path: Path, tensors: Mapping[str, Tensor], source: str, mode: str) -> None:
    """Write the packed tensors atomically (a reader never sees half a file)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        # clone: safetensors refuses tensors that share storage (a fused layer's rows are views).
        save_file({k: v.clone() for k, v in tensors.items()}, tmp,
                  metadata={"source": source, "mode": mode, "torch": torch.__version__, "format": str(FORMAT)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
