"""Top-k middle-token retrieval (LM-Infinite, final version) over a bounded-memory store.

Tokens that leave the local window and are not among the first n_global land
in a per-layer `MiddleStore`: unrotated keys and values kept off the hot path
(host memory by default, optionally float16), in blocks of `block` tokens with
per-block, per-dim min/max summary keys on the fast device.

For the query being generated, the k middle tokens with the highest score
q_d . k (q rotated to the insertion distance d) are found exactly but without
scanning every token: a block's summary bounds the best score any of its
tokens can reach (sum over dims of max(q*kmax, q*kmin)), so blocks are visited
best bound first until the k-th best exact score beats every unvisited bound.
Only the chosen blocks' keys are brought to the fast device.
"""

from __future__ import annotations

import torch
from torch import Tensor


class MiddleStore:
    """Unrotated middle K/V of one layer, grown in blocks, searched by bounds."""

    def __init__(self, n_kv_heads: int, head_dim: int, block: int, fast_device: torch.device,
                 store_device: torch.device, dtype: torch.dtype) -> None:
        self.n_kv_heads, self.head_dim, self.block = n_kv_heads, head_dim, block
        self.fast_device, self.store_device, self.dtype = fast_device, store_device, dtype
        self.length = 0
        cap = 4 * block
        self.k = torch.zeros(n_kv_heads, cap, head_dim, device=store_device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.kmin = torch.zeros(n_kv_heads, 0, head_dim, device=fast_device, dtype=torch.float32)
        self.kmax = torch.zeros_like(self.kmin)

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
        return 2 * self.kmin.numel() * self.kmin.element_size()

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add unrotated keys/values [Hkv, n, D] of the next n middle tokens."""
        n = k.shape[1]
        if n == 0:
            return
        need = self.length + n
        if need > self.k.shape[1]:
            cap = max(need, 2 * self.k.shape[1])
            cap = -(-cap // self.block) * self.block
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.zeros(self.n_kv_heads, cap, self.head_dim, device=self.store_device, dtype=self.dtype)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.k[:, self.length:need] = k.to(self.store_device, self.dtype)
        self.v[:, self.length:need] = v.to(self.store_device, self.dtype)
        first = self.length // self.block  # the first block whose summary changes
        self.length = need
        self._summarise(first)

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (undo appends), summaries included."""
        if n >= self.length:
            return
        self.length = n
        keep = n // self.block  # whole blocks whose summaries are unchanged
        self.kmin, self.kmax = self.kmin[:, :keep], self.kmax[:, :keep]
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
        self.kmin = torch.cat([self.kmin[:, :first], lo], dim=1)
        self.kmax = torch.cat([self.kmax[:, :first], hi], dim=1)

    def top_k(self, q: Tensor, k: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
        """Exact top-k middle tokens for queries q [H, D] (already rotated and scaled).

        Returns (scores [H, k'], keys [H, k', D], values [H, k', D]) on the fast
        device, k' = min(k, stored tokens); heads h share KV head h // groups.
        """
        h = q.shape[0]
        k = min(k, self.length)
        qf = q.float()
        kv_of = torch.arange(h, device=q.device) // groups                            # [H]
        # Best score any token of a block can reach, per head: [H, nb].
        bound = torch.maximum(qf[:, None, :] * self.kmax[kv_of], qf[:, None, :] * self.kmin[kv_of]).sum(-1)
        order = torch.argsort(bound, dim=1, descending=True)                        # [H, nb]
        nb = self.n_blocks
        m = min(nb, -(-k // self.block) + 1)
        while True:
            blocks = order[:, :m]                                                   # [H, m]
            tok = (blocks[:, :, None] * self.block + torch.arange(self.block, device=q.device)).flatten(1)
            valid = tok < self.length                                               # [H, m*B]
            tok = tok.clamp(max=self.length - 1)
            keys = self._gather(self.k, kv_of, tok)                                 # [H, m*B, D]
            scores = torch.einsum("hd,hnd->hn", qf, keys.float()).masked_fill(~valid, float("-inf"))
            best = torch.topk(scores, k, dim=1)
            if m >= nb:
                break
            next_bound = bound.gather(1, order[:, m:m + 1])[:, 0]                   # [H]
            if bool((best.values[:, -1] >= next_bound).all()):
                break
            m = min(nb, 2 * m)
        idx = tok.gather(1, best.indices)                                           # [H, k] store positions
        return best.values, self._gather(self.k, kv_of, idx), self._gather(self.v, kv_of, idx)

    def _gather(self, store: Tensor, kv_of: Tensor, tok: Tensor) -> Tensor:
        """store[kv_of[h], tok[h, j]] -> [H, n, D] on the fast device, moving only those rows."""
        kv = kv_of.to(self.store_device)[:, None].expand_as(tok)
        return store[kv, tok.to(self.store_device)].to(self.fast_device)
