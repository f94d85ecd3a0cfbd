"""Forwards replayed from CUDA graphs.

Once the window has filled, every forward of a given block size has the same
shapes: only the token ids, the rotations, the ring slots and the 0/-inf masks
change value.  The whole model forward (about 2,600 kernels for a 7B model) is
captured once per cache and block size and replayed with those tensors
refreshed in place, so the GPU no longer idles while Python launches kernels
one by one: decode steps, and prefill chunks too.  Forwards that change shape
or do host work (window still filling, first tokens being stored, middle-token
retrieval, a model split over devices, a short last chunk) run eagerly.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import Tensor

from .cache import LambdaCache, StepPlan


def _tensor_fields(plan: StepPlan) -> dict[str, Tensor]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
            if f.init and isinstance(getattr(plan, f.name), Tensor)}


def _buffers(cache: LambdaCache) -> tuple[int, ...]:
    """Addresses the graph has baked in: it is stale if any buffer was replaced."""
    return tuple(t.data_ptr() for layer in cache.layers for t in (layer.k_ring, layer.v_ring, layer.k_global,
                                                                   layer.v_global))


class StepGraph:
    """A captured forward of a block of `n_new` tokens through one cache (or, without
    `capture`, the same static-buffer forward run eagerly: the path the tests check on CPU)."""

    def __init__(self, adapter, cache: LambdaCache, plan: StepPlan, logits: bool, capture: bool = True) -> None:
        # Weak: the cache holds this graph, and a cycle would keep both alive after the cache is dropped.
        self.adapter, self.cache = adapter, weakref.proxy(cache)
        # Private copies of every per-forward tensor; ring_span None sends writes through the slot index.
        self.plan = dataclasses.replace(
            plan, ring_span=None, **{k: v.clone() for k, v in _tensor_fields(plan).items()},
            window_bias={w: b.clone() for w, b in plan.window_bias.items()})
        self.ids = torch.zeros(1, plan.n_new, dtype=torch.long, device=cache.device)  # [1, C]
        self.rows = slice(-1, None) if logits else None
        self.buffers = _buffers(cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.capture = capture

    def fits(self, plan: StepPlan) -> bool:
        """Whether `plan` differs from the captured one only in tensor values."""
        p = self.plan
        if (plan.n_new, plan.ring_view, plan.global_view, plan.global_new) != (p.n_new, p.ring_view, p.global_view,
                                                                                 p.global_new):
            return False
        mine, theirs = _tensor_fields(p), _tensor_fields(plan)
        if mine.keys() != theirs.keys() or plan.window_bias.keys() != p.window_bias.keys():
            return False
        if any(mine[k].shape != theirs[k].shape for k in mine):
            return False
        return self.buffers == _buffers(self.cache)

    def run(self, ids: Tensor, plan: StepPlan) -> Tensor | None:
        """Logits [1, 1, V] of the block's last row (or None) under `plan`; the caller commits the plan."""
        self.ids.copy_(ids)
        for name, t in _tensor_fields(plan).items():
            getattr(self.plan, name).copy_(t)
        for w, b in plan.window_bias.items():
            self.plan.window_bias[w].copy_(b)
        if not self.capture:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return None if self.logits is None else self.logits.clone()  # the next replay overwrites it

    def _forward(self) -> Tensor | None:
        with self.cache.replaying(self.plan):
            return self.adapter.forward(self.ids, self.cache, rows=self.rows)

    def _capture(self) -> None:
        dev = self.cache.device
        # Warm up on a side stream (lazy handles, the kernel self-check); these runs
        # write this block's K/V into its own slots, exactly what the replay will write.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()


def graphable(cache: LambdaCache, plan: StepPlan) -> bool:
    """Whether a forward under `plan` can be captured and replayed."""
    return (plan.ring_view == cache.ring_size and plan.global_new is None
            and not plan.retrieve and plan.evict_slots is None
            and all(layer.k_ring.device == cache.layers[0].k_ring.device for layer in cache.layers))


def graphed_forward(adapter, cache: LambdaCache, ids: Tensor, logits: bool, capture: bool = True) -> Tensor | None:
    """Add ids [1, C] to the cache, through a graph when the forward allows it.

    Returns the logits of the last row ([1, 1, V]) when `logits`, else None.
    """
    plan = cache.plan(ids.shape[1])
    rows = slice(-1, None) if logits else None
    if not graphable(cache, plan):
        with cache.replaying(plan):
            out = adapter.forward(ids, cache, rows=rows)
    else:
        key = (plan.n_new, logits)
        graph = cache.graphs.get(key)
        if graph is None or not graph.fits(plan):
            graph = StepGraph(adapter, cache, plan, logits, capture)
            cache.graphs[key] = graph
        out = graph.run(ids, plan)
    cache.commit(plan)
    return out


def graphed_step(adapter, cache: LambdaCache, token: int, capture: bool = True) -> Tensor:
    """Logits [V] of a one-token forward, through the cache's graph when the step allows it."""
    ids = torch.full((1, 1), token, dtype=torch.long, device=cache.device)
    return graphed_forward(adapter, cache, ids, logits=True, capture=capture)[0, -1]
