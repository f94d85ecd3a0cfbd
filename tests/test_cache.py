"""The Λ cache through its public API only: the step protocol, snapshots, its state for files.

Every check compares against an independent run (a fresh engine, an uninterrupted
stream), never against the cache's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from lminf_cli.errors import InputError, UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings

SETTINGS = LambdaSettings(n_global=3, n_local=8, limit_distance=12, chunk_size=5)
RETRIEVING = SETTINGS.replace(middle_top_k=3, middle_from_layer=0, middle_distance=4, middle_block=4)


@pytest.fixture(scope="module")
def lm():
    return from_hf(tiny_llama(4, 2, trained=16, layers=2, seed=4), None)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def buffers(cache) -> list[torch.Tensor]:
    """Everything the cache holds, from its own state_dict."""
    return [t.clone() for _, t in sorted(cache.state_dict().items())]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("settings", [SETTINGS, RETRIEVING], ids=["lambda", "retrieval"])
def test_the_step_protocol_by_hand_equals_the_engine(lm, settings):
    engine = Engine(lm, settings)
    want = engine.encode(ids(23), continued=False)
    cache = engine.new_cache()
    x = torch.tensor([ids(23)])
    for s in range(0, 23, 5):
        block = x[:, s:s + 5]
        plan = cache.plan(block.shape[1])
        lm.adapter.forward(block, cache, plan)
        cache.commit(plan)
    assert cache.meta_state() == want.cache.meta_state()
    assert same(buffers(cache), buffers(want.cache))


def test_a_plan_changes_nothing_until_committed(lm):
    engine = Engine(lm, SETTINGS)
    state = engine.encode(ids(30))
    before = state.cache.meta_state()
    plan = state.cache.plan(4)
    assert state.cache.meta_state() == before  # no re-base was due: planning alone records nothing
    assert plan.start == before["length"] and plan.n_new == 4
    with pytest.raises(ValueError):
        state.cache.plan(6)  # more than one chunk
    stale = state.cache.plan(1)
    engine.step(state, 3)
    with pytest.raises(ValueError, match="cannot be committed"):
        state.cache.commit(stale)


@pytest.mark.parametrize("settings", [SETTINGS, RETRIEVING], ids=["lambda", "retrieval"])
@pytest.mark.parametrize("budget", [4, 40])  # a few slots, or the whole ring across a re-base
def test_snapshot_restore_is_bit_identical_and_continues_like_no_detour(lm, settings, budget):
    engine = Engine(lm, settings)
    state = engine.encode(ids(37), continued=False)
    mark, before, meta = state.snapshot(budget), buffers(state.cache), state.cache.meta_state()
    engine.encode(ids(budget - 2, seed=1), state)
    engine.step(state, 7)
    assert state.cache.meta_state() != meta
    state.restore(mark)
    assert state.cache.meta_state() == meta and same(buffers(state.cache), before)
    # Going on from the restored state equals a stream that never took the detour.
    plain = engine.encode(ids(37), continued=False)
    engine.encode(ids(9, seed=2), state)
    engine.encode(ids(9, seed=2), plain)
    assert same(buffers(state.cache), buffers(plain.cache)) and torch.equal(state.logits, plain.logits)


def test_state_dict_round_trip_into_a_fresh_cache(lm):
    engine = Engine(lm, RETRIEVING)
    state = engine.encode(ids(61))
    fresh = engine.new_cache()
    fresh.load_state_dict(state.cache.state_dict(), state.cache.meta_state())
    assert fresh.meta_state() == state.cache.meta_state() and same(buffers(fresh), buffers(state.cache))
    # Both continue identically.
    a, b = engine.step(state, 11), engine.forward(fresh, torch.tensor([[11]]), rows=slice(-1, None),
                                                  retrieve_last=True)[0, -1]
    assert torch.equal(a, b)


def test_a_short_stream_saves_only_the_slots_it_used(lm):
    engine = Engine(lm, SETTINGS)
    short = engine.encode(ids(2)).cache.state_dict()
    assert short["layers.0.k_ring"].shape[2] == 2 and short["layers.0.k_global"].shape[2] == 2
    full = engine.encode(ids(40)).cache.state_dict()
    assert full["layers.0.k_ring"].shape[2] == SETTINGS.ring_size
    assert full["layers.0.k_global"].shape[2] == SETTINGS.n_global


@pytest.mark.parametrize("meta", [
    {"length": 10, "base": 11, "rebases": 1},         # origin past the end
    {"length": 40, "base": 0, "rebases": 2},          # re-bases that moved nothing
    {"length": 40, "base": 5, "rebases": 0},          # an origin moved without a re-base
    {"length": 2 ** 40, "base": 0, "rebases": 0},     # positions far beyond what a rotation may reach
    {"length": 40, "base": 1, "rebases": -3},
    {"length": "40", "base": 0, "rebases": 0},
    {"length": True, "base": 0, "rebases": 0},
    {"length": 40, "base": 0},
])
def test_inconsistent_counters_are_refused(lm, meta):
    engine = Engine(lm, SETTINGS)
    state = engine.encode(ids(40))
    with pytest.raises(InputError):
        engine.new_cache().load_state_dict(state.cache.state_dict(), meta)


def test_tensors_of_the_wrong_shape_or_missing_or_extra_are_refused(lm):
    engine = Engine(lm, RETRIEVING)
    state = engine.encode(ids(40))
    tensors, meta = state.cache.state_dict(), state.cache.meta_state()
    cases = {
        "missing": {k: v for k, v in tensors.items() if k != "layers.1.v_ring"},
        "shape": {**tensors, "layers.0.k_global": tensors["layers.0.k_global"][:, :, :1]},
        "middle shape": {**tensors, "layers.0.middle_k": tensors["layers.0.middle_k"][:, :-1]},
        "extra": {**tensors, "layers.0.something": torch.zeros(1)},
        "integers": {**tensors, "layers.0.k_ring": tensors["layers.0.k_ring"].long()},
    }
    for name, bad in cases.items():
        with pytest.raises(InputError):
            engine.new_cache().load_state_dict(bad, meta)
        assert name


def test_set_retrieval_is_validated_and_cannot_conjure_stores(lm):
    plain = Engine(lm, SETTINGS).new_cache()
    with pytest.raises(UsageError, match="no middle-token store"):
        plain.set_retrieval(3)
    cache = Engine(lm, RETRIEVING.replace(middle_from_layer=1)).new_cache()
    with pytest.raises(UsageError, match="layer 1"):
        cache.set_retrieval(3, from_layer=0)
    with pytest.raises(UsageError, match="middle_distance"):
        cache.set_retrieval(3, distance=99)
    cache.set_retrieval(0)
    assert not cache.settings.retrieves and cache.has_middle


def test_bytes_are_fixed_at_creation(lm):
    engine = Engine(lm, SETTINGS)
    state = engine.encode(ids(6))
    held = state.cache.nbytes
    engine.encode(ids(300, seed=3), state)
    assert state.cache.nbytes == held
