"""A decode step's arithmetic as TorchScript functions: the int8 window's write and attention, and
the whole layer stack of a Llama-family block in one call.

Why: past its kernels, a CPU decode step is a few thousand small operations (norms of 576 numbers,
int8 roundings of a few rows, views, conversions), and from Python each one costs the interpreter
and torch's argument parsing on top of its own few microseconds.  TorchScript runs the same
operations, in the same order, on the same kernels, from its C++ interpreter: the logits are the
Python path's bit for bit (tests/test_step_script.py).  On SmolLM2-135M (bfloat16, int4 weights,
int8 window, 2 cores, AMX Xeon) a step at 9k tokens took 0.76x the time of the layer-by-layer
Python path (alternating processes, scripts/step_time.py; docs/benchmarks.md, session 7).
`torch.compile` of the step measured slower than eager (session 6): it re-generates the small
kernels, and its guards and graph breaks cost what the interpreter saves.

TorchScript is deprecated in favour of torch.compile, but ships in torch 2.13: `scripted` compiles
a function once and, should this torch not script it, returns the function itself, which runs the
same arithmetic from Python.  $LMINF_SCRIPTED_STEP=off runs everything from Python, the layer
stack layer by layer (for comparisons).

Shapes: H query heads, Hkv KV heads, g = H / Hkv, D head dim; one new token; ring buffers as
ring.Int8Ring keeps them, without the batch dim: keys k8 [Hkv, size, D] int8, values transposed
vt8 [Hkv, D, width] int8 (width: size rounded up to KERNEL_K), scales [2, Hkv, size] float32.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import native
from .quant import int8_rows, packed_product

ENV = "LMINF_SCRIPTED_STEP"
# The weight-only int8 kernel reads its inner (reduction) dim in blocks of 16: other sizes return
# garbage or crash (torch 2.13, measured: 16, 48, 80, 112 ... exact; 4, 8, 13, 24, 40, 100 not).
# p @ V reduces over slots, so the ring's transposed values get a width rounded up to it (the extra
# slots stay zero); the scores (torch._int_mm, exact integer sums) take any head dim.
KERNEL_K = 16
# (TorchScript reads no module globals: the functions below take these as default arguments.)
# Up to this many KV heads a decode step's scores are one integer product against every head's keys
# (Hkv times the arithmetic, one pass over memory); above it, one product per head.
ALL_HEADS_MAX = 4


def enabled() -> bool:
    """Whether the layer stack may run as one scripted call ($LMINF_SCRIPTED_STEP, read every step)."""
    return os.environ.get(ENV, "on") != "off"


def scripted(fn: Callable) -> Callable:
    """`fn` compiled by TorchScript (once per process), or `fn` itself: with $LMINF_SCRIPTED_STEP=off,
    or if this torch cannot script it."""
    return _compiled(fn) if enabled() else fn


@functools.cache
def _compiled(fn: Callable) -> Callable:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script says it is deprecated
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - any failure to compile means: the same function from Python
        return fn


def padded(n: int, block: int = KERNEL_K) -> int:
    """n slots rounded up to a whole number of the int8 kernel's blocks (KERNEL_K)."""
    return -(-n // block) * block


def rms_norm(x: Tensor, weight: Tensor, eps: float, use_native: bool = False) -> Tensor:
    """weight * rms_norm(x in float32), in x's dtype: what the plain HF RMSNorm classes compute
    (adapters.decoder.PLAIN_RMS_NORMS), in torch's fused op, or with use_native (CPU, native kernels
    loaded, a weight of x's dtype) in one call of lminf::rms_norm (the same roundings; the sum of
    squares in another order)."""
    if use_native:
        return torch.ops.lminf.rms_norm(x, weight, eps)
    y = torch.rms_norm(_f32(x), [x.shape[-1]], None, eps)
    return weight * (y if y.dtype == x.dtype else y.to(x.dtype))


def native_attend(k8: Tensor, head_dim: int) -> bool:
    """Whether int8_attend may run as native.int8_decode_attend for this ring: built and loaded, on the
    CPU, a head dim of whole 16-lane vectors (the kernel's; every supported family has one)."""
    return k8.device.type == "cpu" and head_dim % 16 == 0 and native.available()


def native_write(k8: Tensor) -> bool:
    """Whether int8_write may run as native.int8_write for this ring: on the CPU, the kernels loaded."""
    return k8.device.type == "cpu" and native.available()


def native_norm(x: Tensor, weight: Tensor) -> bool:
    """Whether rms_norm may run as native.rms_norm: on the CPU, x and its weight both float32 or
    both bfloat16, the kernels loaded."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and native.available())


def _f32(x: Tensor) -> Tensor:
    # (.float() of a float32 tensor returns it, but still costs a dispatch)
    return x if x.dtype == torch.float32 else x.float()


def int8_write(k: Tensor, v: Tensor, k8: Tensor, vt8: Tensor, scales: Tensor, a: int, b: int,
               use_native: bool = False) -> None:
    """Store k/v [Hkv, C, D] (keys rotated) in ring slots [a, b) as int8, one scale per slot and head
    (quant.int8_rows, scales rounded to bfloat16: what state files keep).  use_native (CPU, kernels
    loaded): the same bytes from one call of lminf::int8_write."""
    if use_native:
        torch.ops.lminf.int8_write(k, v, k8, vt8, scales, a, b)
        return
    q, s = int8_rows(torch.stack([k, v]), torch.bfloat16)  # [2, Hkv, C, D], [2, Hkv, C]: one pass for both
    k8[:, a:b] = q[0]
    vt8[:, :, a:b] = q[1].transpose(1, 2)
    scales[:, :, a:b] = s  # (bfloat16 values, held in float32: the copy converts)


def int8_attend(ql: Tensor, qg: Tensor, k8: Tensor, vt8: Tensor, scales: Tensor, n: int, local_bias: Tensor,
                k_global: Tensor, v_global: Tensor, global_bias: Tensor | None, ones: Tensor, scale: float,
                softcap: float | None, return_lse: bool, use_native: bool, all_heads_max: int = ALL_HEADS_MAX,
                block: int = KERNEL_K) -> tuple[Tensor, Tensor | None]:
    """Decode-step Λ-attention over ring slots [0, n) and the global keys, straight from the int8 ring.

    ql/qg [Hkv, R, D]: folded query rows (g per KV head) rotated at their positions / to the cap.
    local_bias [R, n] (or per head [1, Hkv, R, n]): 0 / -inf over the slots.  k_global/v_global
    [Hkv, G, D]; global_bias [R, G] or None (no row sees a global key).  `ones` [D] bfloat16.  One
    softmax over both branches, in float32.  Returns out [Hkv, R, D] float32 and, with return_lse,
    its log-sum-exp [Hkv, R] (else None).

    use_native (native_attend said so): without a soft-cap, all of it is one call of the native
    kernel (native/int8_attend.cpp), which computes the same with the query rounded to int16
    (head dims 64 and 128 on AVX-512) or not at all, where the ops below round it to int8 and `p`
    to bfloat16; they are its reference (tests/test_native.py) and the fallback.
    """
    if use_native and softcap is None:
        out, lse = torch.ops.lminf.int8_decode_attend(ql, qg, k8, vt8, scales, n, local_bias, k_global, v_global,
                                                      global_bias, scale)
        return out, (lse if return_lse else None)
    hkv, rows, d = ql.shape
    g = k_global.shape[1] if global_bias is not None else 0
    scores = torch.empty(hkv, rows, n + g, dtype=torch.float32)                          # [Hkv, R, n + G]
    local = scores[:, :, :n]
    # Scores as int8 x int8 -> int32 (torch._int_mm: exact integer sums), the query rounded like
    # the keys, one scale per row; then one float pass for both scales and one for the bias.
    # Why not the weight-only kernel (bfloat16 q x int8 K): it reduces over the head dim (64
    # values) and spends most of its time in per-output reductions.  The products alone, 30
    # layers at 8,704 slots: 6.0 ms with it, 3.4 ms here (2 cores, AMX Xeon); with the extra
    # float pass for the key scales the whole attention gains less (14.1 -> 13.5-13.9 ms,
    # scripts/decode_attention_forms.py), but any head dim decodes straight from the ring.
    q8, q_scale = int8_rows(ql, torch.float32)                                           # [Hkv, R, D], [Hkv, R]
    size = k8.shape[1]
    if hkv <= all_heads_max and 2 * n >= size:
        # One call against every head's keys ([Hkv * size, D], a view): Hkv times the products,
        # but one pass of the library over memory; each head's rows are the diagonal blocks.
        # (It reads every slot: while the ring is less than half full, one call per head reads less.)
        raw = torch._int_mm(q8.view(hkv * rows, d), k8.view(hkv * size, d).t())           # [Hkv*R, Hkv*size]
        raw = raw.as_strided([hkv, rows, n], [rows * hkv * size + size, hkv * size, 1])
    else:
        raw = torch.stack([torch._int_mm(q8[j], k8[j, :n].t()) for j in range(hkv)])      # [Hkv, R, n]
    torch.mul(raw, scales[0, :, None, :n], out=local)
    if softcap is not None:
        local.mul_(q_scale[:, :, None] * (scale / softcap)).tanh_().mul_(softcap)
        local.add_(local_bias.reshape(-1, rows, n))
    else:
        torch.addcmul(local_bias.reshape(-1, rows, n), local, q_scale[:, :, None] * scale, out=local)
    if global_bias is not None:
        g_scores = torch.matmul(_f32(qg), _f32(k_global).transpose(-1, -2)).mul_(scale)   # [Hkv, R, G]
        if softcap is not None:
            g_scores = torch.tanh(g_scores / softcap) * softcap
        torch.add(g_scores, global_bias.reshape(-1, rows, g), out=scores[:, :, n:])
    lse: Tensor | None = None
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)                                                # [Hkv, R]
        probs = torch.exp(scores - lse[:, :, None])
    else:  # one fused kernel: logsumexp and exp were 3.8 of a 37 ms step at 9k
        probs = torch.softmax(scores, dim=-1)
    # p @ V with V = V8 * scale per slot: the scales go into p, then the weight-only int8 kernel
    # (one call per head; it reduces over slots here, where it is fast).
    w = vt8.shape[-1]
    # Slots the kernel reduces over: the whole width once the ring is at least half full (a view,
    # and the zero-weighted rest costs less to read than copying the part in use: at 8k of
    # 8,704 slots that copy was 3 ms a step), else the part in use (a copy: cheaper than reading
    # the zero-weighted rest while the ring is mostly empty, 27.3 against 27.7 ms a step at 2k).
    if 2 * n >= w:
        m, vt = w, vt8
    else:
        m = padded(n, block)
        vt = vt8[:, :, :m].contiguous()
    if m > n:  # zero weights for the padding slots, whatever they hold
        p_local = torch.zeros(hkv, rows, m, dtype=torch.bfloat16)
    else:
        p_local = torch.empty(hkv, rows, m, dtype=torch.bfloat16)
    torch.mul(probs[:, :, :n], scales[1, :, None, :n], out=p_local[:, :, :n])           # [Hkv, R, n]
    out = torch.stack([torch.ops.aten._weight_int8pack_mm(p_local[j], vt[j], ones)
                       for j in range(hkv)]).float()                                     # [Hkv, R, D]
    if global_bias is not None:
        out += torch.matmul(probs[:, :, n:], _f32(v_global))
    return out, lse


def llama_layers(x: Tensor, weights: list[list[Tensor]], biases: list[list[Tensor | None]], kinds: list[list[str]],
                 eps: list[float], rings: list[list[Tensor]], step_mat: Tensor, slot: int, n: int,
                 local_bias: Tensor, global_bias: Tensor | None, n_global: int, scale: float, n_heads: int,
                 n_kv_heads: int, head_dim: int) -> Tensor:
    """Every layer of a Llama-family decoder for one token x [1, hidden] (model dtype).

    Per layer: weights [input norm, post-attention norm, then qweight and qscales of q/k/v fused,
    o, gate/up fused, down]; biases and kinds ('int4' or 'int8') of those four; eps: the two norms' of
    every layer, in order; rings [k8, vt8, scales, ones [D], k_global [Hkv, G, D], v_global]
    (ring.Int8Ring.decode_buffers and the cache's global keys).  step_mat [D, 2D] float32: the
    rotation at the token's relative position | the rotation to the distance cap.  The token
    is written to ring slot `slot` and attends to slots [0, n) under local_bias [g, n] and to the
    first `n_global` global keys under global_bias [g, G] (None: it sees none).  Where the native
    kernels are built, native.llama_layers runs these operations instead, looped in C++, with the
    native attention, write and norm in place of these torch ops (LlamaAdapter.decode_layers).
    """
    h_q, h_kv, d = n_heads, n_kv_heads, head_dim
    g = h_q // h_kv
    for i in range(len(weights)):
        w, b, k, r = weights[i], biases[i], kinds[i], rings[i]
        # Attention: q/k/v as one product, every rotation of q and k as one float32 matmul.
        qkv = packed_product(rms_norm(x, w[0], eps[2 * i]), k[0], w[2], w[3], b[0])  # [1, (H + 2 Hkv) D]
        qk = torch.matmul(_f32(qkv[0, :(h_q + h_kv) * d].view(h_q + h_kv, d)), step_mat)  # [H + Hkv, 2D]
        v = qkv[0, (h_q + h_kv) * d:].view(h_kv, 1, d)
        int8_write(qk[h_q:, :d].view(h_kv, 1, d), v, r[0], r[1], r[2], slot, slot + 1)
        q_local = qk[:h_q, :d].reshape(h_kv, g, d)
        q_cap = qk[:h_q, d:2 * d].reshape(h_kv, g, d) if global_bias is not None else q_local
        o, _ = int8_attend(q_local, q_cap, r[0], r[1], r[2], n, local_bias, r[4][:, :n_global],
                           r[5][:, :n_global], global_bias, r[3], scale, None, False, False)  # [Hkv, g, D]
        x = x + packed_product(o.to(x.dtype).view(1, h_q * d), k[1], w[4], w[5], b[1])
        # MLP: gate and up as one product.
        gate_up = packed_product(rms_norm(x, w[1], eps[2 * i + 1]), k[2], w[6], w[7], b[2])   # [1, 2 I]
        inter = gate_up.shape[-1] // 2
        x = x + packed_product(torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:], k[3], w[8],
                               w[9], b[3])
    return x
