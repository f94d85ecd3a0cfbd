"""Λ-shaped attention math: rotary embeddings and the two-branch softmax.

LM-Infinite (Han et al., arXiv 2308.16137) lets a query at position i see
  * the local branch: keys j with 0 <= i - j < n_local, at their true distance;
  * the global branch: the first n_global keys when i - j >= n_local, at the
    capped distance L (key unrotated, query rotated to angle L * w);
and one softmax spans both.  Here each branch is computed by its own fused call
and the two are merged exactly through their log-sum-exp, so no n x n mask or
doubled head dimension is ever needed.  This module is pure math: the cache
decides which keys exist and builds the additive masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one model family.

    `inv_freq` holds one frequency per rotated pair ([rotary_dim / 2]).  Only the
    first `rotary_dim` dims of a head rotate (GPT-J, NeoX, Phi rotate part of
    it).  `interleaved` pairs dims (0, 1), (2, 3) ... (GPT-J); otherwise dim k
    pairs with k + rotary_dim / 2 (Llama's rotate_half).  `scaling` multiplies
    q and k once (YaRN-style attention scaling); rotation itself stays pure.
    """

    inv_freq: Tensor
    head_dim: int
    rotary_dim: int
    interleaved: bool = False
    scaling: float = 1.0

    def cos_sin(self, positions: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin tables [len(positions), rotary_dim] for integer positions.

        Angles are formed in float64 so that even large relative offsets keep
        full float32 precision in the result.
        """
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None, :]  # [C, R/2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)  # [C, R]: (w0, w0, w1, w1, ...)
        else:
            angles = torch.cat([angles, angles], dim=-1)  # [C, R]: (w0..w_{R/2-1}, w0..)
        return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate x [..., C, head_dim] by the angles in cos/sin [C or 1, rotary_dim]."""
        r = self.rotary_dim
        if r == 0:  # nothing rotates (ALiBi models)
            return x
        if r == self.head_dim:
            return x * cos + self._pair_swap(x) * sin
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat([rot * cos + self._pair_swap(rot) * sin, rest], dim=-1)

    def matrix(self, cos: Tensor, sin: Tensor) -> Tensor:
        """The rotation for one angle set (cos/sin [1, rotary_dim]) as a [D, D] matrix,
        so that x @ M == rotate(x): one matmul instead of a handful of small ops."""
        d, r = self.head_dim, self.rotary_dim
        eye = torch.eye(d, device=cos.device, dtype=cos.dtype)
        if r == 0:
            return eye
        m = torch.zeros(d, d, device=cos.device, dtype=cos.dtype)
        m[:r, :r] = self._pair_swap(eye[:r, :r]) * sin  # row i holds swap(e_i): x @ it == swap(x)
        m[:r, :r] += torch.diag(cos[0])
        m[r:, r:] = eye[r:, r:]
        return m

    def _pair_swap(self, x: Tensor) -> Tensor:
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))  # [..., R/2, 2]
            return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def small_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for the tiny products of a decode step (rotations, the global branch); float32 on the CPU.

    Why: on the CPU a bfloat16 batched GEMM this small ([9, 1, 64] x [64, 128], [3, 3, 64] x
    [64, 100]) costs 20-75 us, mostly the library's per-call set-up, against ~3 us in float32;
    four per layer were ~8 ms of a 49 ms decode step at 8k (AMX Xeon, profiled).  float32
    accumulates exactly as the bfloat16 kernel does inside, so only the final rounding moves.
    On other devices: the product in the inputs' dtype (both must match there).
    """
    if a.device.type == "cpu":
        # (.float() on a float32 tensor returns it, but still costs a dispatch: a few a layer add up)
        return torch.matmul(a if a.dtype == torch.float32 else a.float(), b if b.dtype == torch.float32 else b.float())
    return torch.matmul(a, b)


def _flash_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


FLASH_CPU = _flash_cpu_available()
# Blocks of at least this many queries split the local branch (LocalSplit) on that kernel.
SPLIT_MIN_ROWS = 32
# Decode (a few query rows) on that kernel: an unmasked span of keys is cut into pieces of at
# least this many keys, run as one batched call.  Why: the kernel works head by head, and a
# step has only Hkv heads (3 on SmolLM2) for the threads to share; pieces give every thread
# work and the pieces merge exactly through their log-sum-exp.  Measured on SmolLM2 at 9k
# (2 cores, bfloat16 + int4, one process, alternating rounds): 48.1 ms per step unpieced,
# 44.9-45.0 with 2 or 4 pieces, 46.3-46.8 with 8-16 (the merge costs more than it gains).
DECODE_PIECE = 1024
DECODE_MAX_PIECES = 4
DECODE_ROWS_MAX = 16  # folded query rows (g per KV head) that count as a decode step
# Up to this many query rows (decode: g rows), CUDA takes the eager matmuls: two
# batched GEMVs read K and V once at full bandwidth, while the fused kernel has
# one query tile per head and leaves most of the GPU idle (measured 6x slower).
CUDA_EAGER_MAX_ROWS = 16
# (device, dtype) -> whether the CUDA memory-efficient kernel passed its self-check.
_CUDA_LSE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _eager_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
               softcap: float | None = None) -> tuple[Tensor, Tensor]:
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hkv, Q, N]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, Q]
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs.to(v.dtype), v), lse


def _cuda_efficient_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                        scale: float) -> tuple[Tensor, Tensor]:
    b, h, nq, _ = q.shape
    n = k.shape[-2]
    attn_bias = None
    if bias is not None:
        # The kernel wants the bias row stride aligned to 16 elements: pad, then view.
        padded = torch.empty(*bias.shape[:-1], n + (-n) % 16, device=q.device, dtype=q.dtype)
        padded[..., :n] = bias
        attn_bias = padded[..., :n].expand(b, h, nq, n)  # [B, Hkv, Q, N]
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_bias, True, 0.0, False, scale=scale)
    return out, lse[..., :nq].float()  # the kernel may pad the LSE rows


def _cuda_kernel_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Check the private fused kernel once against the eager math before trusting it."""
    key = (str(device), dtype)
    if key not in _CUDA_LSE_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, 2, n, 64, device=device, dtype=dtype, generator=g) for n in (37, 83, 83))
            bias = torch.zeros(37, 83, device=device, dtype=dtype)
            bias[:, 50:] = NEG_INF
            o1, l1 = _cuda_efficient_lse(q, k, v, bias, 0.125)
            o2, l2 = _eager_lse(q, k, v, bias, 0.125)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            ok = bool(torch.allclose(o1.float(), o2.float(), atol=tol) and torch.allclose(l1, l2, atol=tol))
        except (RuntimeError, TypeError, AttributeError):
            ok = False
        _CUDA_LSE_OK[key] = ok
    return _CUDA_LSE_OK[key]


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                       fused: bool = True, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query row.

    q [B, Hkv, Q, D] (query heads of one KV group folded into Q), k/v [B, Hkv, N, D],
    bias [Q, N] additive (0 or -inf), or per head [1, Hkv, Q, N] (ALiBi), or None.
    Returns out [B, Hkv, Q, D] and lse [B, Hkv, Q] (float32).  Fused kernels return
    both on CPU (flash) and CUDA (memory-efficient, after a one-time self-check);
    otherwise exact eager math.  `softcap` (Gemma 2) squashes the scaled logits to
    softcap * tanh(s / softcap) before the bias; no fused kernel does that, so it
    always takes the eager path.
    """
    if softcap is not None:
        return _eager_lse(q, k, v, bias, scale, softcap)
    if fused and FLASH_CPU and q.device.type == "cpu":
        if bias is not None:
            bias = bias.to(q.dtype)
        # The private kernel assumes unit stride along the head dim (it returns garbage otherwise).
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
        return out, lse.float()
    if (fused and q.device.type == "cuda" and q.shape[-2] > CUDA_EAGER_MAX_ROWS
            and _cuda_kernel_ok(q.device, q.dtype)):
        return _cuda_efficient_lse(q, k, v, bias, scale)
    return _eager_lse(q, k, v, bias, scale)


@dataclass(frozen=True)
class LocalSplit:
    """The local branch of a full window cut so that most keys need no mask.

    For a block of C queries at positions [p, p + C) and a window W, every query sees
    the W - C keys at [p + C - W, p); only the 2C - 1 keys at the window's two edges
    ([p - W + 1, p + C - W) and the block itself) need a mask.  The fused CPU kernel
    is ~15% slower with a mask than without, so the bulk runs unmasked.
    spans: ring slices [a, b) of the unmasked keys (two when the ring wraps);
    edge_slots [2C - 1] ring slots of the edge keys; edge_bias [g*C, 2C - 1] 0 / -inf.
    A decode step (C = 1) sees every key of its window, itself included: spans only, and
    no edges (empty edge_slots).
    """

    spans: tuple[tuple[int, int], ...]
    edge_slots: Tensor
    edge_bias: Tensor


def lambda_attention(q_local: Tensor, q_global: Tensor,
                     k_local: Tensor, v_local: Tensor, local_bias: Tensor | None,
                     k_global: Tensor | None, v_global: Tensor | None, global_bias: Tensor | None,
                     scale: float, fused: bool = True, return_lse: bool = False,
                     softcap: float | None = None,
                     split: LocalSplit | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Λ-attention for a block of queries, both branches under one softmax.

    q_local  [B, H, C, D]: queries rotated at their own positions (local branch).
    q_global [B, H, C, D]: the same queries rotated to the distance cap L.
    k_local/v_local [B, Hkv, N, D]: window keys rotated at their positions.
    k_global/v_global [B, Hkv, G, D]: the first tokens' keys, unrotated.
    local_bias [g*C, N], global_bias [g*C, G]: additive masks over the folded
    query rows (g = H / Hkv), or per head [1, Hkv, g*C, N] / [1, Hkv, g*C, G] (ALiBi).
    global_bias None means no query sees a global key.  softcap: see attention_with_lse.
    split: the same local keys and mask as a LocalSplit (local_bias is then unused).
    Returns [B, H, C, D], and with return_lse the joint log-sum-exp [B, Hkv, g*C]
    so that further keys (retrieved middle tokens) can join the same softmax.
    """
    b, h, c, d = q_local.shape
    hkv = k_local.shape[1]
    g = h // hkv
    # Fold the g query heads sharing one KV head into the row axis: KV is never repeated.
    ql = q_local.reshape(b, hkv, g * c, d)  # [B, Hkv, g*C, D]
    if (fused and q_local.device.type == "cuda" and g * c <= CUDA_EAGER_MAX_ROWS and not return_lse
            and softcap is None and global_bias is not None and k_global is not None and k_global.shape[2]):
        qg = q_global.reshape(b, hkv, g * c, d)  # [B, Hkv, g*C, D]
        return joint_few_rows(ql, qg, k_local, v_local, local_bias, k_global, v_global, global_bias,
                              scale).reshape(b, h, c, d)
    if split is not None:
        parts = [part for a, e in split.spans if e > a  # (the CPU kernel dies on zero keys)
                 for part in _span_attention(ql, k_local, v_local, a, e, scale, fused, softcap)]
        if split.edge_slots.numel():
            k_edge = k_local.index_select(2, split.edge_slots)                                # [B, Hkv, 2C-1, D]
            v_edge = v_local.index_select(2, split.edge_slots)
            parts.append(attention_with_lse(ql, k_edge, v_edge, split.edge_bias, scale, fused, softcap))
    else:
        parts = [attention_with_lse(ql, k_local, v_local, local_bias, scale, fused, softcap)]  # [B, Hkv, g*C, D]
    has_global = not (global_bias is None or k_global is None or k_global.shape[2] == 0)
    if len(parts) == 1 and not has_global:
        out, lse = parts[0]
        # reshape: CUDA kernels return [B, Q, Hkv, D]-strided outputs that cannot be viewed;
        # .to: pieces come back merged in float32.
        out = out.reshape(b, h, c, d).to(q_local.dtype)
        return (out, lse) if return_lse else out
    lses = [lse for _, lse in parts]
    if has_global:
        qg = q_global.reshape(b, hkv, g * c, d)  # [B, Hkv, g*C, D]
        g_scores = small_matmul(qg, k_global.transpose(-1, -2)).float() * scale  # [B, Hkv, g*C, G]
        if softcap is not None:
            g_scores = torch.tanh(g_scores / softcap) * softcap
        g_scores = g_scores + global_bias.float()
        lses.append(torch.logsumexp(g_scores, dim=-1))
    total = torch.logsumexp(torch.stack(lses), dim=0) if len(lses) > 2 else torch.logaddexp(*lses)  # [B, Hkv, g*C]
    # Re-weight each part by its share of the joint softmax; rows with no
    # visible global key get exp(-inf) = 0 from that branch.
    if has_global:
        g_probs = torch.exp(g_scores - total[..., None])
        if q_local.device.type == "cpu":
            merged = small_matmul(g_probs, v_global)                                 # [B, Hkv, g*C, D]
        else:
            merged = torch.matmul(g_probs.to(v_global.dtype), v_global).float()
    else:
        merged = torch.zeros(b, hkv, g * c, d, device=q_local.device)
    for out, lse in parts:
        merged.addcmul_(out.float(), torch.exp(lse - total)[..., None])
    merged = merged.to(q_local.dtype).reshape(b, h, c, d)
    return (merged, total) if return_lse else merged


def _span_attention(ql: Tensor, k: Tensor, v: Tensor, a: int, e: int, scale: float, fused: bool,
                    softcap: float | None) -> list[tuple[Tensor, Tensor]]:
    """Unmasked attention of folded query rows ql [B, Hkv, R, D] to keys [a, e) of k/v [B, Hkv, N, D].

    Returns (out, lse) parts for lambda_attention's merge.  A long span seen by a few rows on
    the fused CPU kernel (a decode step) is cut into P equal pieces run as one batched call
    (P calls' worth of work, see DECODE_PIECE) and merged here into one part (out in float32),
    plus the few keys left over as a part of their own.
    """
    n, b, rows = e - a, ql.shape[0], ql.shape[2]
    pieces = min(n // DECODE_PIECE, DECODE_MAX_PIECES)
    if not (fused and FLASH_CPU and ql.device.type == "cpu" and softcap is None and b == 1
            and rows <= DECODE_ROWS_MAX and pieces >= 2):
        return [attention_with_lse(ql, k[:, :, a:e], v[:, :, a:e], None, scale, fused, softcap)]
    size = n // pieces
    hkv, d = k.shape[1], k.shape[3]
    # Ring slots [a, a + pieces * size) as [pieces, Hkv, size, D]: a view, nothing is copied.
    kp = k[0, :, a:a + pieces * size].view(hkv, pieces, size, d).transpose(0, 1)
    vp = v[0, :, a:a + pieces * size].view(hkv, pieces, size, d).transpose(0, 1)
    out, lse = attention_with_lse(ql.expand(pieces, -1, -1, -1), kp, vp, None, scale, fused)  # [P, Hkv, R, ...]
    span_lse = torch.logsumexp(lse, dim=0, keepdim=True)                                          # [1, Hkv, R]
    parts = [((out.float() * torch.exp(lse - span_lse)[..., None]).sum(dim=0, keepdim=True), span_lse)]
    if a + pieces * size < e:
        rest = slice(a + pieces * size, e)
        parts.append(attention_with_lse(ql, k[:, :, rest], v[:, :, rest], None, scale, fused))
    return parts


def joint_few_rows(q_local: Tensor, q_global: Tensor, k_local: Tensor, v_local: Tensor, local_bias: Tensor,
                   k_global: Tensor, v_global: Tensor, global_bias: Tensor, scale: float) -> Tensor:
    """Both branches under one plain softmax, for a few query rows (decode).

    Shapes as in lambda_attention, queries already folded: q [B, Hkv, R, D].  Every
    row sees at least its own key, so no row is fully masked.  About ten small
    kernels per layer, against some thirty for two log-sum-exp branches and their
    merge: on a GPU a decode step is mostly kernel count.
    """
    s = torch.cat([torch.matmul(q_local, k_local.transpose(-1, -2)),
                   torch.matmul(q_global, k_global.transpose(-1, -2))], dim=-1)   # [B, Hkv, R, N + G]
    rows = s.shape[:-1]
    bias = torch.cat([local_bias.expand(*rows, local_bias.shape[-1]),
                      global_bias.expand(*rows, global_bias.shape[-1])], dim=-1)  # [B, Hkv, R, N + G]
    p = torch.softmax(s.float() * scale + bias.float(), dim=-1).to(v_local.dtype)
    n = k_local.shape[-2]
    b, hkv, r, d = q_local.shape
    out = torch.matmul(p[..., :n], v_local)                                         # [B, Hkv, R, D]
    # out += p_global @ v_global, accumulated in float32 inside the batched GEMM.
    return torch.baddbmm(out.view(b * hkv, r, d), p[..., n:].reshape(b * hkv, r, -1),
                         v_global.reshape(b * hkv, -1, d)).view(b, hkv, r, d)


def merge_extra_keys(out: Tensor, lse: Tensor, scores: Tensor, values: Tensor) -> Tensor:
    """Add keys to an already-normalised softmax: out [H, D] with log-sum-exp lse [H],
    extra raw scores [H, k] (scale applied) and their values [H, k, D]."""
    extra = torch.logsumexp(scores, dim=-1)                                  # [H]
    total = torch.logaddexp(lse, extra)
    probs = torch.exp(scores - total[:, None])                               # [H, k]
    added = torch.bmm(probs[:, None], values.float())[:, 0]                  # [H, D]
    return (out.float() * torch.exp(lse - total)[:, None] + added).to(out.dtype)
