"""One-token forwards replayed from a CUDA graph.

Once the window has filled, every decode step has the same shapes: only the
token id, its rotation matrix, its ring slot and the 0/-inf masks change value.
The whole model step (about 2,000 kernels for a 7B model) is captured once per
cache and replayed with those few tensors refreshed in place, so the GPU no
longer idles while Python launches kernels one by one.  Steps that change
shape or do host work (window still filling, first tokens being stored,
middle-token retrieval, a model split over devices) run eagerly as before.
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
    """A captured one-token forward of `adapter` through one cache (or, without
    `capture`, the same static-buffer step run eagerly: the path the tests check on CPU)."""

    def __init__(self, adapter, cache: LambdaCache, plan: StepPlan, capture: bool = True) -> None:
        # Weak: the cache holds this graph, and a cycle would keep both alive after the cache is dropped.
        self.adapter, self.cache = adapter, weakref.proxy(cache)
        # Private copies of every per-step tensor; ring_span None sends writes through the slot index.
        self.plan = dataclasses.replace(
            plan, ring_span=None, **{k: v.clone() for k, v in _tensor_fields(plan).items()},
            window_bias={w: b.clone() for w, b in plan.window_bias.items()})
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=cache.device)  # [1, 1]
        self.buffers = _buffers(cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.capture = capture

    def fits(self, plan: StepPlan) -> bool:
        """Whether `plan` differs from the captured one only in tensor values."""
        p = self.plan
        if (plan.ring_view, plan.global_view, plan.global_new) != (p.ring_view, p.global_view, p.global_new):
            return False
        mine, theirs = _tensor_fields(p), _tensor_fields(plan)
        if mine.keys() != theirs.keys() or plan.window_bias.keys() != p.window_bias.keys():
            return False
        if any(mine[k].shape != theirs[k].shape for k in mine):
            return False
        return self.buffers == _buffers(self.cache)

    def run(self, token: int, plan: StepPlan) -> Tensor:
        """Logits [1, 1, V] for `token` under `plan`; the caller commits the plan."""
        self.ids.fill_(token)
        for name, t in _tensor_fields(plan).items():
            getattr(self.plan, name).copy_(t)
        for w, b in plan.window_bias.items():
            self.plan.window_bias[w].copy_(b)
        if not self.capture:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the static output

    def _forward(self) -> Tensor:
        with self.cache.replaying(self.plan):
            return self.adapter.forward(self.ids, self.cache, rows=slice(-1, None))

    def _capture(self) -> None:
        dev = self.cache.device
        # Warm up on a side stream (lazy handles, the kernel self-check); these runs
        # write this token's K/V into its own slot, exactly what the replay will write.
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
    """Whether a one-token step under `plan` can be captured and replayed."""
    return (plan.n_new == 1 and plan.ring_view == cache.ring_size and plan.global_new is None
            and not plan.retrieve and plan.evict_slots is None
            and all(layer.k_ring.device == cache.layers[0].k_ring.device for layer in cache.layers))


def graphed_step(adapter, cache: LambdaCache, token: int, capture: bool = True) -> Tensor:
    """Logits [V] of a one-token forward, through the cache's graph when the step allows it."""
    plan = cache.plan(1)
    graph: StepGraph | None = getattr(cache, "step_graph", None)
    if not graphable(cache, plan):
        with cache.replaying(plan):
            logits = adapter.forward(torch.tensor([[token]], device=cache.device), cache, rows=slice(-1, None))
    else:
        if graph is None or not graph.fits(plan):
            graph = StepGraph(adapter, cache, plan, capture)
            cache.step_graph = graph
        logits = graph.run(token, plan)
    cache.commit(plan)
    return logits[0, -1]
