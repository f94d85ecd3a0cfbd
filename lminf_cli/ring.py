"""The window's storage: one layer's ring of recent keys and values, in the cache's dtype or in int8.

A ring holds `size` slots of keys (rotated at relative positions) and values for every KV head.
The layer cache (cache.py) decides which slots a forward writes and which keys a query may see;
a ring only stores, reads back and re-rotates, and owns how that is laid out in memory:

* `FloatRing`: keys and values [1, Hkv, size, D] in the cache's dtype; reads are views.
* `Int8Ring` (`kv_quantize="int8"`, CPU): every slot's key and value per head as int8 with one
  scale (quant.int8_rows), about half of bfloat16's bytes.  A decode step reads it without
  de-quantizing: scores = q @ K^T as an integer product (`torch._int_mm`, the query rounded to
  int8 too) with K [size, D], and out = p @ V through PyTorch's weight-only int8 kernel
  (`aten._weight_int8pack_mm`, A @ B^T with B int8 [N, K] contiguous) with the values kept
  transposed, V^T [1, Hkv, D, size].  Why: a decode step streams the whole window from memory;
  at 8k keys on SmolLM2 (30 layers, 2 cores, AMX Xeon) the bfloat16 spans took 23.4 ms a step
  and the int8 products 11.7 ms (scripts/decode_attention_forms.py); integer scores, session 6,
  a little less again, and for any head dim (docs/benchmarks.md).  The arithmetic of a span's
  write and of the decode attention is step_script's (TorchScript functions, which the scripted
  layer stack calls too).  Prefill (many rows, compute-bound) reads the ring de-quantized to the
  cache's dtype and runs the usual fused kernel.

Both keep the same file layout (state_dict): keys and values [1, Hkv, n, D], and for int8
their scales [1, Hkv, n] (bfloat16: scales are rounded to it when made, held in float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import step_script
from .errors import InputError
from .quant import ACT_DTYPE, int8_rows
from .step_script import padded

Slots = Tensor | tuple[int, int] | None  # ring slots as an index [m], a slice (a, b), or None: all
# A re-base rotates the window's keys this many slots at a time.  Why: rotating a whole int8 ring
# at once made float32 copies of it (6.7 MB a layer on SmolLM2) and a few temporaries the same
# size; those re-bases set the peak memory of a long prefill (peak RSS read chunk by chunk at
# 32k: +30 MB at the first re-base).  The rotation is per slot, so blocks give the same keys.
ROTATE_BLOCK = 1024


def _index(slots: Slots) -> Tensor | slice:
    if slots is None:
        return slice(None)
    if isinstance(slots, tuple):
        return slice(*slots)
    return slots


def checked_tensor(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """tensors[key], which must exist with this shape."""
    if key not in tensors:
        raise InputError(f"tensor '{key}' is missing (truncated or damaged)")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise InputError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {shape}")
    return t


class FloatRing:
    """Keys and values [1, Hkv, size, D] in the cache's dtype."""

    def __init__(self, n_kv_heads: int, size: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.k = torch.zeros(1, n_kv_heads, size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def device(self) -> torch.device:
        return self.k.device

    def buffers(self) -> tuple[Tensor, ...]:
        """Every tensor the ring holds (their addresses are what a captured graph bakes in)."""
        return self.k, self.v

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def write(self, k: Tensor, v: Tensor, slots: Slots) -> None:
        """Store k/v [1, Hkv, C, D] (keys already rotated) at `slots` ([C] index or a slice of C)."""
        i = _index(slots)
        self.k[:, :, i] = k
        self.v[:, :, i] = v

    def view(self, n: int) -> tuple[Tensor, Tensor]:
        """Keys and values of slots [0, n) as [1, Hkv, n, D] in the cache's dtype."""
        return self.k[:, :, :n], self.v[:, :, :n]

    def rows(self, slots: Slots) -> tuple[Tensor, Tensor]:
        """Keys and values of some slots as [Hkv, m, D] in the cache's dtype (tokens leaving the window)."""
        i = _index(slots)
        if isinstance(i, slice):
            return self.k[0, :, i], self.v[0, :, i]
        return self.k[0][:, i], self.v[0][:, i]

    def rotate(self, rotate) -> None:
        """Apply `rotate` (x [1, Hkv, n, D] -> rotated x, one angle for every slot) to every stored
        key, ROTATE_BLOCK slots at a time."""
        for a in range(0, self.k.shape[2], ROTATE_BLOCK):
            block = self.k[:, :, a:a + ROTATE_BLOCK]
            block.copy_(rotate(block))

    def save(self, slots: Tensor | None) -> tuple[Tensor, ...]:
        """Copies of what `slots` hold (None: everything), for load() to put back."""
        i = _index(slots)
        return tuple(t[:, :, i].clone() for t in self.buffers())

    def load(self, slots: Tensor | None, saved: tuple[Tensor, ...]) -> None:
        i = _index(slots)
        for t, s in zip(self.buffers(), saved, strict=True):
            t[:, :, i] = s

    def state_dict(self, n: int) -> dict[str, Tensor]:
        """Slots [0, n) on the CPU: 'k_ring', 'v_ring' [1, Hkv, n, D]."""
        k, v = self.view(n)
        return {"k_ring": k.cpu().contiguous(), "v_ring": v.cpu().contiguous()}

    def load_state_dict(self, tensors: Mapping[str, Tensor], prefix: str, n: int) -> list[str]:
        """Fill slots [0, n) from state_dict output (keys under `prefix`), checked; returns the keys read."""
        shape = (1, self.k.shape[1], n, self.k.shape[3])
        names = []
        for name in ("k_ring", "v_ring"):
            key = prefix + name
            t = checked_tensor(tensors, key, shape)
            if not t.is_floating_point():
                raise InputError(f"tensor '{key}' is {t.dtype}, not floating point (a state of an int8 KV "
                                 "cache needs --kv-quantize int8)")
            getattr(self, name[0])[:, :, :n] = t.to(device=self.device, dtype=self.dtype)
            names.append(key)
        return names


class Int8Ring:
    """Keys [1, Hkv, size, D] and values transposed [1, Hkv, D, width] as int8 (width: size rounded up
    to step_script.KERNEL_K), each slot and head with its scale (`scales` [2, 1, Hkv, size]: keys', values').
    Slots never written are zeros."""

    def __init__(self, n_kv_heads: int, size: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError("an int8 KV cache runs on the CPU only")
        self.dtype = dtype  # what reads de-quantize to
        self.k = torch.zeros(1, n_kv_heads, size, head_dim, device=device, dtype=torch.int8)
        self.vt = torch.zeros(1, n_kv_heads, head_dim, padded(size), device=device, dtype=torch.int8)
        # Scales are rounded to bfloat16 (what state files keep) but held in float32: the decode step's
        # float32 passes then take them without a conversion (mixed-dtype passes ran 2x slower).
        # Both in one buffer [2, 1, Hkv, size] (views k_scale, v_scale): a decode step writes them at once.
        self.scales = torch.zeros(2, 1, n_kv_heads, size, device=device, dtype=torch.float32)
        self.k_scale, self.v_scale = self.scales[0], self.scales[1]
        self._ones = torch.ones(head_dim, dtype=ACT_DTYPE)  # the p @ V product's per-output scales

    @property
    def device(self) -> torch.device:
        return self.k.device

    def buffers(self) -> tuple[Tensor, ...]:
        return self.k, self.vt, self.scales

    def decode_buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What step_script's int8 functions take: keys [Hkv, size, D], values transposed [Hkv, D, width],
        scales [2, Hkv, size] (views) and the p @ V product's unit scales [D]."""
        return self.k[0], self.vt[0], self.scales[:, 0], self._ones

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def write(self, k: Tensor, v: Tensor, slots: Slots) -> None:
        if isinstance(slots, tuple):  # a span: the scripted write (the decode step's)
            k8, vt8, scales, _ = self.decode_buffers()
            step_script.scripted(step_script.int8_write)(k[0], v[0], k8, vt8, scales, *slots,
                                                         step_script.native_write(k8))
            return
        i = _index(slots)
        q, s = int8_rows(torch.stack([k[0], v[0]]), ACT_DTYPE)    # [2, Hkv, C, D], [2, Hkv, C]: one pass for both
        self.k[0, :, i] = q[0]
        self.vt[0, :, :, i] = q[1].transpose(1, 2)
        self.scales[:, 0, :, i] = s.float()  # (bfloat16 values in float32; an index put wants one dtype)

    def view(self, n: int) -> tuple[Tensor, Tensor]:
        """Slots [0, n) de-quantized to the cache's dtype, [1, Hkv, n, D] each (new tensors)."""
        # Scaled in place: a prefill block's peak memory holds one copy of each, not two.
        # (The scales in the same dtype first: a mixed-dtype product takes a slower path.)
        k = self.k[:, :, :n].to(self.dtype).mul_(self.k_scale[:, :, :n, None].to(self.dtype))
        v = self.vt[:, :, :, :n].transpose(2, 3).to(self.dtype, memory_format=torch.contiguous_format)
        return k, v.mul_(self.v_scale[:, :, :n, None].to(self.dtype))

    def rows(self, slots: Slots) -> tuple[Tensor, Tensor]:
        i = _index(slots)
        k = self.k[0][:, i].to(self.dtype) * self.k_scale[0][:, i, None].to(self.dtype)
        v = self.vt[0][:, :, i].transpose(1, 2).to(self.dtype) * self.v_scale[0][:, i, None].to(self.dtype)
        return k, v

    def rotate(self, rotate) -> None:
        # Rotated in float32 and rounded again: a key is re-rounded at most twice in its life in the
        # window (a re-base every ring size tokens), each time within half a step of its scale.
        for a in range(0, self.k.shape[2], ROTATE_BLOCK):
            i = slice(a, a + ROTATE_BLOCK)
            q, s = int8_rows(rotate(self.k[:, :, i].float() * self.k_scale[:, :, i, None]), ACT_DTYPE)
            self.k[:, :, i] = q
            self.k_scale[:, :, i] = s

    def save(self, slots: Tensor | None) -> tuple[Tensor, ...]:
        i = _index(slots)
        return self.k[:, :, i].clone(), self.vt[..., i].clone(), self.scales[..., i].clone()

    def load(self, slots: Tensor | None, saved: tuple[Tensor, ...]) -> None:
        i = _index(slots)
        self.k[:, :, i], self.vt[..., i], self.scales[..., i] = saved

    def state_dict(self, n: int) -> dict[str, Tensor]:
        """Slots [0, n) on the CPU: 'k_ring', 'v_ring' int8 [1, Hkv, n, D] and their scales [1, Hkv, n]."""
        return {"k_ring": self.k[:, :, :n].contiguous(), "k_ring_scale": self.k_scale[:, :, :n].to(ACT_DTYPE),
                "v_ring": self.vt[..., :n].transpose(2, 3).contiguous(),
                "v_ring_scale": self.v_scale[:, :, :n].to(ACT_DTYPE)}

    def load_state_dict(self, tensors: Mapping[str, Tensor], prefix: str, n: int) -> list[str]:
        hkv, d = self.k.shape[1], self.k.shape[3]
        names = []
        parts = {}
        for name in ("k_ring", "v_ring"):
            t = checked_tensor(tensors, prefix + name, (1, hkv, n, d))
            if t.dtype != torch.int8:
                raise InputError(f"tensor '{prefix + name}' is {t.dtype}, not int8 (a state of a float KV cache "
                                 "needs --kv-quantize none)")
            s = checked_tensor(tensors, prefix + name + "_scale", (1, hkv, n))
            if s.dtype != ACT_DTYPE:
                raise InputError(f"tensor '{prefix + name}_scale' is {s.dtype}, not bfloat16")
            if not torch.isfinite(s).all():
                raise InputError(f"tensor '{prefix + name}_scale' holds values that are not finite")
            parts[name] = (t, s)
            names += [prefix + name, prefix + name + "_scale"]
        (k, ks), (v, vs) = parts["k_ring"], parts["v_ring"]
        self.k[:, :, :n] = k
        self.k_scale[:, :, :n] = ks
        self.vt[..., :n] = v.transpose(2, 3)
        self.v_scale[:, :, :n] = vs
        return names

    def attend_one(self, ql: Tensor, qg: Tensor, n: int, local_bias: Tensor, k_global: Tensor, v_global: Tensor,
                   global_bias: Tensor | None, scale: float, softcap: float | None,
                   return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        """Decode-step Λ-attention over slots [0, n) and the global keys, straight from the int8 ring.

        ql/qg [Hkv, R, D]: folded query rows (g per KV head) rotated at their positions / to the cap.
        local_bias [R, n] (or per head [1, Hkv, R, n]): 0 / -inf over the slots.  k_global/v_global
        [1, Hkv, G, D]; global_bias [R, G] or None (no row sees a global key).  One softmax over
        both branches, in float32.  Returns out [Hkv, R, D] float32 and, with return_lse, its
        log-sum-exp [Hkv, R] (else None).
        """
        # (step_script.int8_attend: the arithmetic, scripted.)
        k8, vt8, scales, ones = self.decode_buffers()
        return step_script.scripted(step_script.int8_attend)(
            ql, qg, k8, vt8, scales, n, local_bias, k_global[0], v_global[0], global_bias, ones, scale, softcap,
            return_lse, step_script.native_attend(k8, ql.shape[-1]))


def make_ring(quantize: str, n_kv_heads: int, size: int, head_dim: int, device: torch.device,
              dtype: torch.dtype) -> FloatRing | Int8Ring:
    """The ring for a cache's `kv_quantize` setting ('none' or 'int8')."""
    cls = Int8Ring if quantize == "int8" else FloatRing
    return cls(n_kv_heads, size, head_dim, device, dtype)


def ring_nbytes(quantize: str, n_kv_heads: int, size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one layer's ring takes (before making one)."""
    if quantize == "int8":
        scale_bytes = torch.empty(0, dtype=torch.float32).element_size()
        return n_kv_heads * ((size + padded(size)) * head_dim + 2 * size * scale_bytes)  # K, V^T, two scales
    return 2 * n_kv_heads * size * head_dim * torch.empty(0, dtype=dtype).element_size()
