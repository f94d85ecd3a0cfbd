"""Forwards replayed from CUDA graphs.

Once the window has filled, every forward of a given block size has the same
shapes: only the token ids, the rotations, the ring slots and the 0/-inf masks
change value.  The whole model forward (about 2,600 kernels for a 7B model) is
captured once per cache and block size and replayed with those tensors
refreshed in place, so the GPU no longer idles while Python launches kernels
one by one: decode steps, and prefill chunks too.  Forwards that change shape
or do host work (window still filling, first tokens being stored, middle-token
retrieval, a model split over devices) run eagerly.

What is captured is exactly one callable, `(ids, plan) -> logits`: the adapter's
forward of one planned step.  Planning and committing stay with the engine,
outside the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .cache import LambdaCache, StepPlan

Forward = Callable[[Tensor, StepPlan], "Tensor | None"]


def _tensor_fields(plan: StepPlan) -> dict[str, Tensor]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
            if f.init and isinstance(getattr(plan, f.name), Tensor)}


def buffer_addresses(cache: LambdaCache) -> tuple[int, ...]:
    """Addresses a graph bakes in: it is stale if any buffer was replaced."""
    return tuple(t.data_ptr() for layer in cache.layers for t in layer.buffers())


class StepGraph:
    """`forward(ids, plan)` for blocks shaped like `plan`, from static buffers: captured
    in a CUDA graph and replayed, or (capture=False) run eagerly on the same buffers,
    the path the tests check on the CPU."""

    def __init__(self, forward: Forward, plan: StepPlan, buffers: tuple[int, ...], capture: bool = True) -> None:
        self.forward = forward
        # Private copies of every per-forward tensor; ring_span None sends writes through the slot index.
        self.plan = dataclasses.replace(
            plan, ring_span=None, **{k: v.clone() for k, v in _tensor_fields(plan).items()},
            window_bias={w: b.clone() for w, b in plan.window_bias.items()})
        self.ids = torch.zeros(1, plan.n_new, dtype=torch.long, device=plan.q_cos.device)  # [1, C]
        self.buffers = buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.capture = capture

    def fits(self, plan: StepPlan, buffers: tuple[int, ...]) -> bool:
        """Whether `plan` differs from the captured one only in tensor values (and the cache is the same)."""
        p = self.plan
        if (plan.n_new, plan.ring_view, plan.global_view, plan.global_new) != (p.n_new, p.ring_view, p.global_view,
                                                                                 p.global_new):
            return False
        mine, theirs = _tensor_fields(p), _tensor_fields(plan)
        if mine.keys() != theirs.keys() or plan.window_bias.keys() != p.window_bias.keys():
            return False
        if any(mine[k].shape != theirs[k].shape for k in mine):
            return False
        return self.buffers == buffers

    def run(self, ids: Tensor, plan: StepPlan) -> Tensor | None:
        """The forward's logits under `plan` (a copy: the next replay overwrites the static ones)."""
        self.ids.copy_(ids)
        for name, t in _tensor_fields(plan).items():
            getattr(self.plan, name).copy_(t)
        for w, b in plan.window_bias.items():
            self.plan.window_bias[w].copy_(b)
        if not self.capture:
            return self.forward(self.ids, self.plan)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return None if self.logits is None else self.logits.clone()

    def _capture(self) -> None:
        dev = self.ids.device
        # Warm up on a side stream (lazy handles, the kernel self-check); these runs
        # write this block's K/V into its own slots, exactly what the replay will write.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(self.ids, self.plan)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward(self.ids, self.plan)


def graphable(cache: LambdaCache, plan: StepPlan) -> bool:
    """Whether a forward under `plan` can be captured and replayed."""
    return (plan.ring_view == cache.ring_size and plan.global_new is None and plan.split is None
            and not plan.retrieve and plan.evict_slots is None
            and all(layer.device == cache.layers[0].device for layer in cache.layers))


def graphed(cache: LambdaCache, key: tuple, forward: Forward, plan: StepPlan, capture: bool = True) -> StepGraph:
    """The cache's graph for forwards of this `key` (block size, rows), made anew when `plan` does not fit it."""
    buffers = buffer_addresses(cache)
    graph = cache.graphs.get(key)
    if graph is None or not graph.fits(plan, buffers):
        graph = StepGraph(forward, plan, buffers, capture)
        cache.graphs[key] = graph
    return graph
