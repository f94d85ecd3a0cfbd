"""Top-k middle-token retrieval (LM-Infinite, final version) over a bounded-memory store.

Tokens that leave the local window and are not among the first n_global land
in a per-layer `MiddleStore`: unrotated keys and values kept off the hot path
(host memory, float16 by default, int8 with per-token scales on request;
memory-mapped files for very long inputs),
in blocks of `block` tokens with per-block, per-dim min/max summary keys on
the fast device.

For the query being generated, the k middle tokens with the highest score
q_d . k (q rotated to the insertion distance d) are wanted.  A block's summary
bounds the best score any of its tokens can reach (sum over dims of
max(q*kmax, q*kmin), as in Quest).  Two searches:

* bounded (`max_blocks` > 0, the default): each KV head reads only
  `max_blocks` blocks, its query heads' best-bound ones, and each query head
  takes the exact top-k among their tokens.
  The cost per step is fixed whatever the length (bounds over every block are a
  few flops per block); a token is missed only when its block's bound ranks
  below `max_blocks` others, which the passkey grid measures.
* exact (`max_blocks` = 0): the few best-bound blocks first, and when their
  k-th best score beats every other bound nothing else is read; otherwise one
  batched matmul over the store settles it.

Only the chosen tokens move to the fast device.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch
from torch import Tensor

from .errors import InputError
from .quant import int8_rows


def mapped_zeros(directory: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero tensor backed by a memory-mapped temporary file that nothing outlives.

    On Linux the file is unlinked at once and mapped through /proc/self/fd (the
    mapping keeps it alive), so not even a crash leaves it behind; elsewhere it
    is removed when the tensor is dropped.  The file is sparse until written.
    """
    fd, path = tempfile.mkstemp(prefix="lminf-middle-", suffix=".bin", dir=directory)
    try:
        source = f"/proc/self/fd/{fd}"
        unlinked = os.path.exists(source)
        if unlinked:
            os.unlink(path)
        t = torch.from_file(source if unlinked else path, shared=True, size=math.prod(shape), dtype=dtype)
    finally:
        os.close(fd)  # the mapping holds the file from here on
    if not unlinked:
        weakref.finalize(t.untyped_storage(), os.unlink, path)
    return t.view(shape)


class MiddleStore:
    """Unrotated middle K/V of one layer, grown in blocks, searched by bounds."""

    def __init__(self, n_kv_heads: int, head_dim: int, block: int, fast_device: torch.device,
                 store_device: torch.device, dtype: torch.dtype, spill_dir: str | None = None) -> None:
        self.n_kv_heads, self.head_dim, self.block = n_kv_heads, head_dim, block
        self.fast_device, self.store_device, self.dtype = fast_device, store_device, dtype
        # int8: each token's key (and value) per head is stored as round(x / s) with s = max|x| / 127,
        # the scales in float32 beside them: about a quarter of float32's bytes, error at most s / 2.
        self.quantized = dtype == torch.int8
        self.length = 0
        # k/v [Hkv, cap, D]: each block of a head is one contiguous run, so a block is read in one copy.
        if spill_dir is not None and store_device.type != "cpu":
            raise ValueError("a memory-mapped middle store lives in host memory (store_device cpu)")
        self.spill_dir = spill_dir
        self._grow(4 * block)
        # Summaries [Hkv, cap, 2D]: a block's row is its per-dim max then min, so the bounds of every
        # block are one matmul.  The buffer grows by doubling: a decode step rewrites one row, never copies.
        self._summary = torch.zeros(n_kv_heads, 4, 2 * head_dim, device=fast_device, dtype=torch.float32)
        self._consts: dict = {}  # small index tensors reused by every search (see _const)
        self.reads = {"blocks": 0, "scans": 0}  # how top-k searches ended (bounds held, or a full scan)
        # Store indices of the tokens the last search returned, per query head ([H, k]): where the
        # model looked (tasks use them to find the passage a question is about).
        self.last_hits: Tensor | None = None

    @property
    def n_blocks(self) -> int:
        """Blocks holding at least one token."""
        return -(-self.length // self.block)

    @property
    def nbytes(self) -> int:
        """Bytes held in the store (host side) and its summaries (fast device)."""
        return self.store_nbytes + self.summary_nbytes

    @property
    def store_nbytes(self) -> int:
        """Bytes of stored keys and values (with their scales when quantized)."""
        scales = 2 * self.k_scale.numel() * self.k_scale.element_size() if self.quantized else 0
        return 2 * self.k.numel() * self.k.element_size() + scales

    @property
    def summary_nbytes(self) -> int:
        """Bytes of block summaries (on the fast device)."""
        return self._summary.numel() * self._summary.element_size()

    # Buffers grown during an encode are inference tensors; every write runs in inference mode
    # so a state loaded (or a checkpoint restored) outside it can still extend them.
    @torch.inference_mode()
    def append(self, k: Tensor, v: Tensor) -> None:
        """Add unrotated keys/values [Hkv, n, D] of the next n middle tokens."""
        n = k.shape[1]
        if n == 0:
            return
        need = self.length + n
        if need > self.k.shape[1]:
            self._grow(-(-max(need, 2 * self.k.shape[1]) // self.block) * self.block)
        for name, x in (("k", k), ("v", v)):
            x = x.to(self.store_device)
            if self.quantized:
                x, scale = int8_rows(x, torch.float32)                                  # [Hkv, n, D], [Hkv, n]
                getattr(self, f"{name}_scale")[:, self.length:need] = scale
            getattr(self, name)[:, self.length:need] = x.to(self.dtype)
        first, filled = divmod(self.length, self.block)  # the first block whose summary changes
        self.length = need
        if filled and filled + n <= self.block:
            # The new tokens join a started block (a decode step): widen its box by them, from the stored
            # (rounded) keys so the result equals a full re-summary.
            new = self.keys(need - n, need)                                             # [Hkv, n, D]
            hi, lo = self._summary[:, first, : self.head_dim], self._summary[:, first, self.head_dim:]
            torch.maximum(hi, new.amax(dim=1), out=hi)
            torch.minimum(lo, new.amin(dim=1), out=lo)
        else:
            self._summarise(first)

    def _grow(self, cap: int) -> None:
        """Make room for cap tokens (a whole number of blocks), keeping what is stored."""
        shape = (self.n_kv_heads, cap, self.head_dim)
        for name in ("k", "v"):
            if self.spill_dir is not None:
                new = mapped_zeros(self.spill_dir, shape, self.dtype)  # a new file: the old one goes with its map
            else:
                new = torch.zeros(shape, device=self.store_device, dtype=self.dtype)
            if self.length:
                new[:, : self.length] = getattr(self, name)[:, : self.length]
            setattr(self, name, new)
            if self.quantized:  # scales stay in RAM: 4 bytes a token and head, against 64 for the token
                scale = torch.zeros(shape[:2], device=self.store_device, dtype=torch.float32)
                if self.length:
                    scale[:, : self.length] = getattr(self, f"{name}_scale")[:, : self.length]
                setattr(self, f"{name}_scale", scale)

    def keys(self, start: int, end: int) -> Tensor:
        """Stored keys of tokens [start, end) as float32 on the fast device: [Hkv, end - start, D]."""
        return self._read("k", slice(start, end))

    def _read(self, name: str, span: slice) -> Tensor:
        x = getattr(self, name)[:, span].to(self.fast_device, torch.float32)
        if self.quantized:
            x = x * getattr(self, f"{name}_scale")[:, span, None].to(self.fast_device)
        return x

    def _rows(self, name: str, rows: Tensor, per_row: int) -> Tensor:
        """Rows of the store seen as [Hkv * cap / per_row, per_row * D], as float32 on the fast device."""
        d = self.head_dim
        x = getattr(self, name).view(-1, per_row * d).index_select(0, rows).to(self.fast_device, torch.float32)
        if self.quantized:
            scale = getattr(self, f"{name}_scale").view(-1, per_row).index_select(0, rows)  # [rows, per_row]
            x = (x.view(-1, per_row, d) * scale.to(self.fast_device)[..., None]).view(-1, per_row * d)
        return x

    @property
    def kmax(self) -> Tensor:
        """Per-block, per-dim maximum of the stored keys: [Hkv, n_blocks, D]."""
        return self._summary[:, : self.n_blocks, : self.head_dim]

    @property
    def kmin(self) -> Tensor:
        """Per-block, per-dim minimum of the stored keys: [Hkv, n_blocks, D]."""
        return self._summary[:, : self.n_blocks, self.head_dim:]

    @property
    def spilled(self) -> bool:
        """Whether the keys and values live in memory-mapped files rather than RAM."""
        return self.spill_dir is not None

    def state_dict(self) -> dict[str, Tensor]:
        """The stored tokens on the CPU: k, v [Hkv, n, D] as stored, and for int8 their scales [Hkv, n]."""
        out = {name: getattr(self, name)[:, : self.length].cpu().contiguous() for name in ("k", "v")}
        if self.quantized:
            out.update({f"{name}_scale": getattr(self, f"{name}_scale")[:, : self.length].cpu().contiguous()
                        for name in ("k", "v")})
        return out

    def load_state_dict(self, tensors: dict[str, Tensor], n: int) -> list[str]:
        """Replace the store with n tokens from state_dict output, in any stored precision (a
        store written on a GPU in bfloat16 loads into a CPU one in float16, an int8 one into
        any other); shapes and dtypes are checked.  Returns the names it read."""
        def get(name: str, shape: tuple[int, ...]) -> Tensor:
            t = tensors.get(name)
            if t is None:
                raise InputError(f"middle-store tensor '{name}' is missing (truncated or damaged)")
            if tuple(t.shape) != shape:
                raise InputError(f"middle-store tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
            return t

        shape = (self.n_kv_heads, n, self.head_dim)
        names, loaded = [], []
        for name in ("k", "v"):
            t = get(name, shape)
            names.append(name)
            if f"{name}_scale" in tensors:  # int8 with per-token scales
                scale = get(f"{name}_scale", shape[:2])
                names.append(f"{name}_scale")
                if t.dtype != torch.int8 or scale.dtype != torch.float32:
                    raise InputError(f"middle-store tensor '{name}' must be int8 with float32 scales")
                t = t.float() * scale[..., None]
            elif not t.is_floating_point():
                raise InputError(f"middle-store tensor '{name}' is {t.dtype}, not floating point")
            loaded.append(t)
        self.truncate(0)
        self.append(*loaded)
        return names

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (undo appends), summaries included."""
        if n >= self.length:
            return
        self.length = n
        keep = n // self.block  # whole blocks whose summaries are unchanged
        if n % self.block:
            self._summarise(keep)

    def _summarise(self, first: int) -> None:
        nb = self.n_blocks
        # Capacity is a whole number of blocks, so the span reshapes without padding.
        span = self.keys(first * self.block, nb * self.block)
        span = span.reshape(self.n_kv_heads, nb - first, self.block, self.head_dim)  # [Hkv, nb', B, D]
        valid = self.length - first * self.block
        # Unfilled slots of the tail block must not widen its bounds.
        mask = (torch.arange((nb - first) * self.block, device=self.fast_device) < valid)
        mask = mask.view(1, nb - first, self.block, 1)
        lo = span.masked_fill(~mask, float("inf")).amin(dim=2)   # [Hkv, nb-first, D]
        hi = span.masked_fill(~mask, float("-inf")).amax(dim=2)
        if nb > self._summary.shape[1]:
            grown = torch.zeros(self.n_kv_heads, max(nb, 2 * self._summary.shape[1]), 2 * self.head_dim,
                                device=self.fast_device, dtype=torch.float32)
            grown[:, :first] = self._summary[:, :first]
            self._summary = grown
        self._summary[:, first:nb] = torch.cat([hi, lo], dim=2)

    def _const(self, name: str, n: int, device: torch.device, dtype: torch.dtype = torch.long,
               repeat: int = 1) -> Tensor:
        """arange(n), repeated `repeat` times end to end, made once: a search runs per layer per token."""
        key = (name, n, device, dtype, repeat)
        t = self._consts.get(key)
        if t is None:
            t = torch.arange(n, device=device, dtype=dtype).repeat(repeat)
            self._consts[key] = t
        return t

    def top_k(self, q: Tensor, k: int, groups: int, max_blocks: int = 0,
              with_keys: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
        """Top-k middle tokens for queries q [H, D] (already rotated and scaled).

        Returns (scores [H, k'], keys [H, k', D], values [H, k', D]) as float32
        on the fast device, k' = min(k, stored tokens); heads h share KV head
        h // groups.  `max_blocks` > 0 reads at most that many blocks per KV head
        (bounded, approximate); 0 gives the exact answer (see the module note).
        `with_keys=False` returns None for the keys (attention needs only scores and values).

        The g query heads of a KV head read one pool of blocks: each head's
        best-bound blocks in turn (a block's place is its best rank among the
        heads), so every head gets its own top blocks and each block is read once.
        """
        h, d = q.shape
        k = min(k, self.length)
        qf = q.float()
        nb, bl = self.n_blocks, self.block
        bounded = 0 < max_blocks < nb
        m = max_blocks if bounded else min(nb, groups * (-(-k // bl) + 1))
        if m >= nb:
            self.reads["scans"] += 1
            return self._scan(qf, k, groups, with_keys)
        hkv, g, dev, sdev = self.n_kv_heads, groups, q.device, self.store_device
        bound = self.bounds(qf, g)                                                  # [H, nb]
        pool = self._pool(bound, g, m)                                              # [Hkv, m]
        # Whole blocks, one contiguous row each of the store seen as [Hkv * blocks, B * D].
        cap_blocks = self.k.shape[1] // bl
        rows = pool.to(sdev) + self._const("kv", hkv, sdev)[:, None] * cap_blocks   # [Hkv, m]
        keys = self._rows("k", rows.flatten(), bl).view(hkv, m * bl, d)             # [Hkv, m*B, D]
        scores = torch.matmul(qf.view(hkv, g, d), keys.transpose(1, 2))            # [Hkv, g, m*B]
        tok = (pool[:, :, None] * bl + self._const("slot", bl, dev)).view(hkv, m * bl)  # [Hkv, m*B]
        if self.length % bl:  # the tail block's unfilled slots hold no token
            scores = scores.masked_fill((tok >= self.length)[:, None], float("-inf"))
        best = torch.topk(scores, k, dim=2)                                         # [Hkv, g, k]
        if not bounded:  # exact only when no block outside the pool could beat the k-th best
            outside = torch.ones(hkv, nb, dtype=torch.bool, device=dev).scatter_(1, pool, False)
            rest = bound.masked_fill(~outside.repeat_interleave(g, 0), float("-inf")).amax(1)  # [H]
            if not bool((best.values.reshape(h, k)[:, -1] >= rest).all()):
                self.reads["scans"] += 1
                return self._scan(qf, k, groups, with_keys)
        self.reads["blocks"] += m * hkv
        picked = torch.gather(tok, 1, best.indices.view(hkv, g * k))               # [Hkv, g*k] token ids
        self.last_hits = picked.view(h, k)
        flat = (picked.to(sdev) + self._const("kv", hkv, sdev)[:, None] * self.v.shape[1]).flatten()
        values = self._rows("v", flat, 1).view(h, k, d)
        sel_k = self._rows("k", flat, 1).view(h, k, d) if with_keys else None
        return best.values.view(h, k), sel_k, values

    def _pool(self, bound: Tensor, groups: int, m: int) -> Tensor:
        """The m blocks each KV head reads: its query heads' best-bound blocks in turn ([Hkv, m] block ids).

        A block's place in the pool is its best rank among the group's heads; only each
        head's top m can make it (their union already holds m blocks).
        """
        hkv, g, nb, dev = self.n_kv_heads, groups, bound.shape[1], bound.device
        top = torch.topk(bound, m, dim=1).indices                                   # [H, m]
        ranks = self._const("rank", m, dev, torch.float32, repeat=hkv * g).view(hkv, g * m)
        best_rank = torch.full((hkv, nb), float(m), device=dev).scatter_reduce_(
            1, top.view(hkv, g * m), ranks, "amin")                                 # [Hkv, nb]
        return torch.topk(best_rank, m, dim=1, largest=False).indices               # [Hkv, m]

    def top_blocks(self, q: Tensor, n: int, groups: int, max_blocks: int = 0) -> tuple[Tensor, Tensor]:
        """Every token of the n blocks whose best token scores highest, for queries q [H, D].

        Block retrieval (InfLLM-style): a fact a sentence long comes back whole, in its
        order, instead of the few tokens that match the query best.  The blocks are ranked
        by their best token among those read (a pool of `max_blocks` best-bound blocks per
        KV head, or all of them when 0).  Returns scores [H, n*B] (unfilled slots of the
        tail block at -inf) and values [H, n*B, D], float32 on the fast device.
        """
        h, d = q.shape
        qf = q.float()
        nb, bl, hkv, g, sdev = self.n_blocks, self.block, self.n_kv_heads, groups, self.store_device
        n = min(n, nb)
        if 0 < max_blocks < nb:
            pool = self._pool(self.bounds(qf, g), g, max_blocks)                    # [Hkv, m]
            self.reads["blocks"] += max_blocks * hkv
        else:
            pool = torch.arange(nb, device=q.device).expand(hkv, nb)
            self.reads["scans"] += 1
        m = pool.shape[1]
        cap_blocks = self.k.shape[1] // bl
        rows = (pool.to(sdev) + self._const("kv", hkv, sdev)[:, None] * cap_blocks).flatten()  # [Hkv*m]
        keys = self._rows("k", rows, bl).view(hkv, m * bl, d)                      # [Hkv, m*B, D]
        scores = torch.matmul(qf.view(hkv, g, d), keys.transpose(1, 2)).view(hkv, g, m, bl)
        if self.length % bl:  # the tail block's unfilled slots hold no token
            tok = pool[:, :, None] * bl + self._const("slot", bl, q.device)          # [Hkv, m, B]
            scores = scores.masked_fill((tok >= self.length)[:, None], float("-inf"))
        choice = torch.topk(scores.amax(dim=3), n, dim=2).indices                  # [Hkv, g, n] places in the pool
        picked = torch.gather(scores, 2, choice[..., None].expand(-1, -1, -1, bl))   # [Hkv, g, n, B]
        blocks = torch.gather(pool, 1, choice.view(hkv, g * n))                      # [Hkv, g*n] block ids
        vrows = (blocks.to(sdev) + self._const("kv", hkv, sdev)[:, None] * cap_blocks).flatten()
        values = self._rows("v", vrows, bl).view(h, n * bl, d)
        best_in_block = picked.argmax(dim=3)                                          # [Hkv, g, n]
        self.last_hits = (blocks.view(hkv, g, n) * bl + best_in_block).view(h, n)
        return picked.reshape(h, n * bl), values

    def bounds(self, q: Tensor, groups: int) -> Tensor:
        """Best score any token of each block can reach, per head: [H, nb] for q [H, D] (float32).

        sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin: one matmul of [q+ | q-]
        against the summaries [kmax | kmin], the g query heads of a KV head batched.
        """
        h, d = q.shape
        qg = q.view(self.n_kv_heads, groups, d)                                     # [Hkv, g, D]
        q2 = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], dim=2)                   # [Hkv, g, 2D]
        # Summaries as the transposed right operand: BLAS streams their contiguous rows, and the
        # result comes out [Hkv, g, nb], already in head order.
        both = torch.matmul(q2, self._summary[:, : self.n_blocks].transpose(1, 2))  # [Hkv, g, nb]
        return both.view(h, -1)

    def _scan(self, qf: Tensor, k: int, groups: int, with_keys: bool = True
              ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Exact top-k by one batched matmul over every stored token (on the store's device)."""
        h, d = qf.shape
        hkv, n = self.n_kv_heads, self.length
        keys = self.k[:, :n]                                                         # [Hkv, n, D]
        if self.quantized:
            keys = keys.float() * self.k_scale[:, :n, None]
        elif self.store_device.type == "cpu":  # CPU half-precision matmuls are slow and imprecise
            keys = keys.float()
        qs = qf.to(self.store_device, keys.dtype).view(hkv, groups, d)              # [Hkv, g, D]
        scores = torch.matmul(qs, keys.transpose(1, 2)).float()                     # [Hkv, g, n]
        best = torch.topk(scores, k, dim=-1)                                        # [Hkv, g, k]
        self.last_hits = best.indices.view(h, k).to(self.fast_device)
        flat = (best.indices + self._const("kv", hkv, self.store_device)[:, None, None] * self.k.shape[1]).flatten()
        sel_v = self._rows("v", flat, 1).view(h, k, d)
        sel_k = self._rows("k", flat, 1).view(h, k, d) if with_keys else None
        return best.values.view(h, k).to(self.fast_device), sel_k, sel_v
