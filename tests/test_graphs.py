"""Decode steps through a static plan (captured as a CUDA graph on a GPU) equal ordinary steps.

On the CPU the static-buffer step runs eagerly: everything but the capture
itself is checked.  On CUDA the same tests capture and replay real graphs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from families import build

from lminf_cli.generate import Engine
from lminf_cli.graphs import StepGraph
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings

# On CUDA graphs are captured and replayed; elsewhere the same static-buffer path runs eagerly.
GRAPHS = "auto" if DEVICE.type == "cuda" else "static"


def engines(lm, settings):
    """The same model and settings, without graphs and through them."""
    return Engine(lm, settings, graphs="off"), Engine(lm, settings, graphs=GRAPHS)


def decode_both(name: str, steps: int, prompt: int = 10, n_global: int = 3, n_local: int = 8, chunk: int = 4,
                top_k: int = 0):
    """Logits of `steps` teacher-forced decode steps, ordinary vs graphed, from the same prompt."""
    lm = from_hf(build(name, device=DEVICE), None, name)
    settings = LambdaSettings.for_model(16, n_global=n_global, n_local=n_local, middle_top_k=top_k,
                                        middle_from_layer=0)
    eager, through_graphs = engines(lm, settings.replace(chunk_size=chunk))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (prompt + steps,), generator=g).tolist()
    plain, graphed = eager.encode(ids[:prompt]), through_graphs.encode(ids[:prompt])
    out_plain, out_graphed = [], []
    for t in ids[prompt:]:
        out_plain.append(eager.step(plain, t).clone())
        out_graphed.append(through_graphs.step(graphed, t).clone())
    return torch.stack(out_plain), torch.stack(out_graphed), graphed.cache, plain.cache


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gptj", "falcon-mq", "bloom"])
def test_graphed_steps_equal_plain_steps(name):
    # 40 steps past a 10-token prompt: the window fills, the ring wraps and re-bases.
    plain, graphed, cache, plain_cache = decode_both(name, steps=40)
    torch.testing.assert_close(graphed, plain, atol=1e-5, rtol=1e-5)
    assert cache.length == plain_cache.length == 50 and cache.rebases == plain_cache.rebases >= 1
    assert isinstance(cache.graphs[(1, True)], StepGraph)


def test_one_graph_serves_every_step_after_the_window_fills():
    lm = from_hf(build("llama", device=DEVICE), None, "llama")
    _, engine = engines(lm, LambdaSettings.for_model(16, n_global=2, n_local=6, chunk_size=4))
    state = engine.encode(list(range(12)))
    graphs = set()
    for t in range(30):
        engine.step(state, t)
        graphs.add(id(state.cache.graphs[(1, True)]))
    assert len(graphs) == 1


def test_retrieval_steps_stay_eager_and_exact():
    plain, graphed, cache, _ = decode_both("llama", steps=20, top_k=2)
    torch.testing.assert_close(graphed, plain, atol=1e-5, rtol=1e-5)
    assert not cache.graphs and cache.middle_nbytes > 0


def test_restored_checkpoint_replays_the_same_answer():
    lm = from_hf(build("llama", device=DEVICE), None, "llama")
    _, engine = engines(lm, LambdaSettings.for_model(16, n_global=2, n_local=6, chunk_size=4))
    state = engine.encode(list(range(20)))
    mark = state.snapshot(8)
    first = [engine.step(state, t).clone() for t in (5, 6, 7)]
    state.restore(mark)
    again = [engine.step(state, t).clone() for t in (5, 6, 7)]
    torch.testing.assert_close(torch.stack(again), torch.stack(first), atol=0, rtol=0)


def test_a_dropped_cache_frees_its_buffers_at_once():
    # No reference cycle (layer -> cache -> layer, graph -> cache -> graph): GPU memory
    # comes back when the last reference goes, not whenever the garbage collector runs.
    import gc
    import weakref

    lm = from_hf(build("llama", device=DEVICE), None, "llama")
    _, engine = engines(lm, LambdaSettings.for_model(16, n_global=2, n_local=6, chunk_size=4))
    state = engine.encode(list(range(20)))
    for t in range(5):
        engine.step(state, t)
    assert state.cache.graphs
    ring = weakref.ref(state.cache.layers[0].k_ring)
    gc.disable()
    try:
        del state
        assert ring() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["llama", "gemma2", "bloom"])
def test_graphed_prefill_chunks_equal_plain_chunks(name):
    lm = from_hf(build(name, device=DEVICE), None, name)
    eager, through_graphs = engines(lm, LambdaSettings.for_model(16, n_global=3, n_local=8, chunk_size=5))
    ids = torch.randint(0, 97, (1, 63), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    plain, graphed = eager.new_cache(), through_graphs.new_cache()
    for s in range(0, 63, 5):
        rows = slice(-1, None) if s + 5 >= 63 else None
        want = eager.forward(plain, ids[:, s:s + 5], rows=rows)
        got = through_graphs.forward(graphed, ids[:, s:s + 5], rows=rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (5, False) in graphed.graphs  # full chunks after the window filled went through one graph
    for a, b in zip(plain.layers, graphed.layers, strict=True):
        torch.testing.assert_close(a.k_ring, b.k_ring, atol=1e-5, rtol=1e-5)
