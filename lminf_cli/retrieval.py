"""Top-k middle-token retrieval (LM-Infinite, final version) over a bounded-memory store.

Tokens that leave the local window and are not among the first n_global land
in a per-layer `MiddleStore`: unrotated keys and values kept off the hot path
(host memory, float16 by default; memory-mapped files for very long inputs),
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
        self.length = 0
        # k/v [Hkv, cap, D]: each block of a head is one contiguous run, so a block is read in one copy.
        if spill_dir is not None and store_device.type != "cpu":
            raise ValueError("a memory-mapped middle store lives in host memory (store_device cpu)")
        self.spill_dir = spill_dir
        self._grow(4 * block)
        # Summaries live in buffers that grow by doubling; kmin/kmax are views of the filled blocks
        # (a decode step rewrites one block, never copies them all).
        self._summary = torch.zeros(2, n_kv_heads, 4, head_dim, device=fast_device, dtype=torch.float32)
        self.kmin, self.kmax = self._summary[0, :, :0], self._summary[1, :, :0]
        self.reads = {"blocks": 0, "scans": 0}  # how top-k searches ended (bounds held, or a full scan)

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
        """Bytes of stored keys and values."""
        return 2 * self.k.numel() * self.k.element_size()

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
        self.k[:, self.length:need] = k.to(self.store_device, self.dtype)
        self.v[:, self.length:need] = v.to(self.store_device, self.dtype)
        first = self.length // self.block  # the first block whose summary changes
        self.length = need
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

    @property
    def spilled(self) -> bool:
        """Whether the keys and values live in memory-mapped files rather than RAM."""
        return self.spill_dir is not None

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (undo appends), summaries included."""
        if n >= self.length:
            return
        self.length = n
        keep = n // self.block  # whole blocks whose summaries are unchanged
        self.kmin, self.kmax = self._summary[0, :, :keep], self._summary[1, :, :keep]
        if n % self.block:
            self._summarise(keep)

    def _summarise(self, first: int) -> None:
        nb = self.n_blocks
        # Capacity is a whole number of blocks, so the span reshapes without padding.
        span = self.k[:, first * self.block: nb * self.block].to(self.fast_device, torch.float32)
        span = span.reshape(self.n_kv_heads, nb - first, self.block, self.head_dim)  # [Hkv, nb', B, D]
        valid = self.length - first * self.block
        # Unfilled slots of the tail block must not widen its bounds.
        mask = (torch.arange((nb - first) * self.block, device=self.fast_device) < valid)
        mask = mask.view(1, nb - first, self.block, 1)
        lo = span.masked_fill(~mask, float("inf")).amin(dim=2)   # [Hkv, nb-first, D]
        hi = span.masked_fill(~mask, float("-inf")).amax(dim=2)
        if nb > self._summary.shape[2]:
            grown = torch.zeros(2, self.n_kv_heads, max(nb, 2 * self._summary.shape[2]), self.head_dim,
                                device=self.fast_device, dtype=torch.float32)
            grown[:, :, :first] = self._summary[:, :, :first]
            self._summary = grown
        self._summary[0, :, first:nb] = lo
        self._summary[1, :, first:nb] = hi
        self.kmin, self.kmax = self._summary[0, :, :nb], self._summary[1, :, :nb]

    def top_k(self, q: Tensor, k: int, groups: int, max_blocks: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k middle tokens for queries q [H, D] (already rotated and scaled).

        Returns (scores [H, k'], keys [H, k', D], values [H, k', D]) as float32
        on the fast device, k' = min(k, stored tokens); heads h share KV head
        h // groups.  `max_blocks` > 0 reads at most that many blocks per KV head
        (bounded, approximate); 0 gives the exact answer (see the module note).

        The g query heads of a KV head read one pool of blocks: each head's
        best-bound blocks in turn (a block's place is its best rank among the
        heads), so every head gets its own top blocks and each block is read once.
        """
        h = q.shape[0]
        k = min(k, self.length)
        qf = q.float()
        nb = self.n_blocks
        bounded = 0 < max_blocks < nb
        m = max_blocks if bounded else min(nb, groups * (-(-k // self.block) + 1))
        if m < nb:
            hkv, g, dev = self.n_kv_heads, groups, q.device
            bound = self.bounds(qf, groups)                                         # [H, nb]
            # A block's place in the pool is its best rank among the group's heads; only each head's
            # top m can make it (their union already holds m blocks).
            top = torch.topk(bound, m, dim=1).indices                               # [H, m]
            ranks = torch.arange(m, device=dev, dtype=torch.float32).repeat(hkv, g)  # [Hkv, g*m]
            best_rank = torch.full((hkv, nb), float(m), device=dev).scatter_reduce_(
                1, top.view(hkv, g * m), ranks, "amin")                             # [Hkv, nb]
            pool = torch.topk(best_rank, m, dim=1, largest=False).indices           # [Hkv, m]
            tok = (pool[:, :, None] * self.block + torch.arange(self.block, device=dev)).flatten(1)  # [Hkv, m*B]
            # Whole blocks, one contiguous copy each (a tail block's unfilled slots are masked).
            by_block = self.k[:, : nb * self.block].view(hkv, nb, self.block, self.head_dim)
            rows = torch.arange(hkv, device=self.store_device)[:, None]
            keys = by_block[rows, pool.to(self.store_device)]                       # [Hkv, m, B, D]
            keys = keys.to(self.fast_device, torch.float32).flatten(1, 2)           # [Hkv, m*B, D]
            scores = torch.matmul(qf.view(hkv, g, -1), keys.transpose(1, 2))       # [Hkv, g, m*B]
            scores = scores.masked_fill((tok >= self.length)[:, None], float("-inf")).view(h, -1)
            best = torch.topk(scores, k, dim=1)                                     # [H, k]
            exact = bounded
            if not bounded:  # exact when no block outside the pool could beat the k-th best
                outside = torch.ones(hkv, nb, dtype=torch.bool, device=dev).scatter_(1, pool, False)
                rest = bound.masked_fill(~outside.repeat_interleave(g, 0), float("-inf")).amax(1)  # [H]
                exact = bool((best.values[:, -1] >= rest).all())
            if exact:
                self.reads["blocks"] += m * hkv
                kv_of = torch.arange(h, device=dev) // g                              # [H]
                picked = keys[kv_of[:, None], best.indices]                         # [H, k, D]
                return best.values, picked, self._gather(self.v, kv_of, tok[kv_of[:, None], best.indices])
        self.reads["scans"] += 1
        return self._scan(qf, k, groups)

    def bounds(self, q: Tensor, groups: int) -> Tensor:
        """Best score any token of each block can reach, per head: [H, nb] for q [H, D] (float32).

        sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin: two small matmuls
        against the summaries, with the g query heads of a KV head batched together.
        """
        h, d = q.shape
        qg = q.view(self.n_kv_heads, groups, d).transpose(1, 2)                     # [Hkv, D, g]
        # Summaries on the left: their rows are contiguous, so each matmul streams them once.
        both = torch.matmul(self.kmax, qg.clamp(min=0)) + torch.matmul(self.kmin, qg.clamp(max=0))  # [Hkv, nb, g]
        return both.transpose(1, 2).reshape(h, -1)

    def _scan(self, qf: Tensor, k: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
        """Exact top-k by one batched matmul over every stored token (on the store's device)."""
        h, d = qf.shape
        hkv, n = self.n_kv_heads, self.length
        keys, values = self.k[:, :n], self.v[:, :n]                                  # [Hkv, n, D]
        if self.store_device.type == "cpu":  # CPU half-precision matmuls are slow and imprecise
            keys = keys.float()
        qs = qf.to(self.store_device, keys.dtype).view(hkv, groups, d)              # [Hkv, g, D]
        scores = torch.matmul(qs, keys.transpose(1, 2)).float()                     # [Hkv, g, n]
        best = torch.topk(scores, k, dim=-1)                                        # [Hkv, g, k]
        idx = best.indices.reshape(hkv, groups * k, 1).expand(hkv, groups * k, d)   # [Hkv, g*k, D]
        sel_k = torch.gather(keys, 1, idx).view(h, k, d)                            # [H, k, D]
        sel_v = torch.gather(values, 1, idx).view(h, k, d)
        return (best.values.view(h, k).to(self.fast_device), sel_k.to(self.fast_device, torch.float32),
                sel_v.to(self.fast_device, torch.float32))

    def _gather(self, store: Tensor, kv_of: Tensor, tok: Tensor) -> Tensor:
        """store[kv_of[h], tok[h, j]] -> float32 [H, n, D] on the fast device, moving only those rows."""
        kv = kv_of.to(self.store_device)[:, None].expand_as(tok)
        return store[kv, tok.to(self.store_device)].to(self.fast_device, torch.float32)
