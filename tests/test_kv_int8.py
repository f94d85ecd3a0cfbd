"""The int8 window (kv_quantize="int8"): against references that hold the same rounded keys and values.

* `Int8Ring` alone: what it stores is each token's key and value within half a step of its
  scale (an independent rounding), and its decode-step attention equals `lambda_attention`
  (the path the dense-reference tests check) run on those same values.
* Whole engines: an int8 engine against a float engine whose ring stores the same rounding
  (`FakeInt8Ring`, written here from `int8_rows` alone): prefill blocks must agree to float
  precision, decode steps within the bfloat16 rounding of the int8 kernel's inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, tiny_llama
from families import FAMILIES, build

from lminf_cli.attention import NEG_INF, lambda_attention
from lminf_cli.cache import LambdaCache
from lminf_cli.documents import Document
from lminf_cli.errors import InputError, SettingsError, UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf, load_model
from lminf_cli.quant import int8_rows
from lminf_cli.ring import FloatRing, Int8Ring
from lminf_cli.settings import LambdaSettings
from lminf_cli.state_io import save_state
from lminf_cli.tasks import encode_document, open_state

# A window of 8, chunks of 5: the ring (13 slots, not a multiple of 16) wraps and re-bases often.
SETTINGS = LambdaSettings(n_global=3, n_local=8, limit_distance=12, chunk_size=5)
INT8 = SETTINGS.replace(kv_quantize="int8")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 97, (n,), generator=gen(seed)).tolist()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def lm(request):
    # head_dim 16: the int8 kernel's decode path (head dims of 16n).
    return from_hf(tiny_llama(4, 2, trained=16, layers=2, seed=4, head_dim=16), None, dtype=request.param)


class FakeInt8Ring(FloatRing):
    """A float ring that stores each key and value rounded as an int8 ring would (the reference)."""

    @staticmethod
    def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, s = int8_rows(x, torch.bfloat16)
        return q.to(dtype) * s[..., None].to(dtype)

    def write(self, k, v, slots):
        super().write(self._rounded(k, self.dtype), self._rounded(v, self.dtype), slots)

    def rotate(self, rotate):
        self.k.copy_(self._rounded(rotate(self.k.float()), self.dtype))


def fake_int8_state(engine: Engine):
    state = engine.new_state()
    for layer in state.cache.layers:
        layer.ring = FakeInt8Ring(layer.ring.k.shape[1], layer.ring.k.shape[2], layer.ring.k.shape[3],
                                  layer.device, layer.ring.dtype)
    return state


# --------------------------------------------------------------------------- the ring alone

def random_ring(size: int = 37, hkv: int = 2, d: int = 16, dtype=torch.float32, seed: int = 0):
    ring = Int8Ring(hkv, size, d, torch.device("cpu"), dtype)
    k = torch.randn(1, hkv, size, d, generator=gen(seed)) * torch.rand(1, hkv, size, 1, generator=gen(seed + 1)) * 3
    v = torch.randn(1, hkv, size, d, generator=gen(seed + 2))
    ring.write(k[:, :, :20], v[:, :, :20], (0, 20))                      # a slice
    ring.write(k[:, :, 20:], v[:, :, 20:], torch.arange(20, size))      # an index
    return ring, k, v


def test_stored_values_are_each_token_rounded_within_half_a_step():
    ring, k, v = random_ring()
    got_k, got_v = ring.view(37)
    for got, want in ((got_k, k), (got_v, v)):
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step / 2 + 1e-2 * step).all()   # + the bfloat16 rounding of the scale
        assert not torch.equal(got, want)  # it is rounded
    assert ring.k.dtype == ring.vt.dtype == torch.int8
    rows_k, rows_v = ring.rows(torch.tensor([3, 30]))
    torch.testing.assert_close(rows_k, got_k[0][:, [3, 30]])
    torch.testing.assert_close(rows_v, got_v[0][:, [3, 30]])


@pytest.mark.parametrize("n", [5, 16, 37])          # filling (padded to 16 inside), a multiple, the full ring
@pytest.mark.parametrize("with_global", [True, False])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_attention_equals_lambda_attention_on_the_same_values(n, with_global, softcap):
    ring, _, _ = random_ring()
    hkv, g, d, n_glob = 2, 3, 16, 4
    q = torch.randn(1, hkv * g, 1, d, generator=gen(7))
    qc = torch.randn(1, hkv * g, 1, d, generator=gen(8))
    visible = torch.rand(g, n, generator=gen(9)) > 0.4
    visible[:, 0] = True
    bias = torch.zeros(g, n).masked_fill(~visible, NEG_INF)                 # [g*C, n]
    kg, vg = torch.randn(1, hkv, n_glob, d, generator=gen(10)), torch.randn(1, hkv, n_glob, d, generator=gen(11))
    gbias = torch.zeros(g, n_glob) if with_global else None
    out, lse = ring.attend_one(q.reshape(hkv, g, d), qc.reshape(hkv, g, d), n, bias, kg, vg, gbias, 0.25, softcap,
                               return_lse=True)
    k, v = ring.view(n)
    want, want_lse = lambda_attention(q, qc, k, v, bias, kg, vg, gbias, 0.25, fused=False, return_lse=True,
                                      softcap=softcap)
    # q is rounded to int8 (a scale per row) and p to bfloat16 for the kernels: ~2-3 significant digits.
    torch.testing.assert_close(out.reshape(want.shape), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[None], want_lse, atol=3e-2, rtol=1e-2)
    plain, none = ring.attend_one(q.reshape(hkv, g, d), qc.reshape(hkv, g, d), n, bias, kg, vg, gbias, 0.25,
                                  softcap)
    assert none is None
    # softmax and exp(s - lse) differ in float32's last bits, which can move p's bfloat16 rounding by a step.
    torch.testing.assert_close(plain, out, atol=2e-3, rtol=1e-2)


def test_a_planted_slot_error_is_caught_by_that_comparison():
    ring, _, _ = random_ring()
    q = torch.randn(2, 3, 16, generator=gen(7))
    bias = torch.zeros(3, 37)
    bias[:, 30:] = NEG_INF
    out, _ = ring.attend_one(q, q, 37, bias, torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16), None, 0.25, None)
    shifted = torch.roll(bias, 1, dims=1)
    wrong, _ = ring.attend_one(q, q, 37, shifted, torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16), None, 0.25, None)
    assert (out - wrong).abs().max() > 0.1


def test_rotation_re_rounds_the_rotated_keys():
    ring, k, _ = random_ring()
    before, _ = ring.view(37)
    c, s = torch.tensor(0.6), torch.tensor(0.8)
    ring.rotate(lambda x: torch.cat([x[..., :8] * c - x[..., 8:] * s, x[..., 8:] * c + x[..., :8] * s], -1))
    after, _ = ring.view(37)
    want = torch.cat([before[..., :8] * c - before[..., 8:] * s, before[..., 8:] * c + before[..., :8] * s], -1)
    step = want.abs().amax(-1, keepdim=True) / 127
    assert ((after - want).abs() <= step / 2 + 1e-2 * step).all()


@pytest.mark.parametrize("kind", ["int8", "float"])
def test_rotation_in_blocks_equals_rotation_at_once(kind, monkeypatch):
    # A re-base rotates ring.ROTATE_BLOCK slots at a time (peak memory): blocks of 5 over 37 slots,
    # the last one short, must give what one rotation of every slot gives, bit for bit.
    import lminf_cli.ring as ring_module

    rings = []
    for block in (5, 10**9):
        monkeypatch.setattr(ring_module, "ROTATE_BLOCK", block)
        if kind == "int8":
            ring, _, _ = random_ring(dtype=torch.bfloat16)
        else:
            ring = FloatRing(2, 37, 16, torch.device("cpu"), torch.bfloat16)
            ring.write(torch.randn(1, 2, 37, 16, generator=gen(7)), torch.randn(1, 2, 37, 16, generator=gen(8)),
                       (0, 37))
        ring.rotate(lambda x: torch.cat([x[..., :8] * 0.6 - x[..., 8:] * 0.8, x[..., 8:] * 0.6 + x[..., :8] * 0.8], -1))
        rings.append(ring)
    assert all(torch.equal(a, b) for a, b in zip(rings[0].buffers(), rings[1].buffers(), strict=True))


# --------------------------------------------------------------------------- whole engines

def run(engine: Engine, state, stream: list[int], decode: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits (every row, chunk by chunk) and decode-step logits."""
    x = torch.tensor([stream])
    pre = []
    for s in range(0, len(stream), engine.chunk_size):
        pre.append(engine.forward(state.cache, x[:, s:s + engine.chunk_size], rows=slice(None))[0])
    steps = [engine.step(state, t).float().reshape(-1) for t in decode]
    return torch.cat(pre).float(), torch.stack(steps)


@pytest.mark.parametrize("retrieval", [False, True], ids=["lambda", "retrieval"])
def test_int8_engine_equals_a_float_engine_holding_the_same_rounded_keys(lm, retrieval):
    settings = INT8.replace(middle_top_k=3, middle_from_layer=0, middle_distance=4, middle_block=4) \
        if retrieval else INT8
    stream, decode = ids(42), ids(30, seed=1)  # > 5 ring sizes: wraps and re-bases in both phases
    int8 = Engine(lm, settings)
    state = int8.new_state()
    assert all(isinstance(layer.ring, Int8Ring) for layer in state.cache.layers)
    got_pre, got_dec = run(int8, state, stream, decode)
    ref = Engine(lm, settings.replace(kv_quantize="none"))
    ref_state = fake_int8_state(ref)
    want_pre, want_dec = run(ref, ref_state, stream, decode)
    assert state.cache.rebases > 2 and state.cache.meta_state() == ref_state.cache.meta_state()
    exact = 1e-5 if lm.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_pre, want_pre, atol=exact, rtol=exact)   # same values, same kernels
    # Decode steps: the kernel's bfloat16 inputs and scores move logits by ~0.1-0.3% of their range; a
    # key one slot off moves them by ~60% (planted, measured).  With retrieval, a top-k search at a near
    # tie may pick another middle token on some steps (a discrete jump from such a difference), so
    # there most steps, not all, are held to it.
    err = (got_dec - want_dec).abs().amax(-1) / want_dec.abs().max()          # [steps]
    tol = 0.01 if lm.dtype == torch.float32 else 0.03
    assert (err.quantile(0.8) if retrieval else err.max()).item() <= tol, err
    # And not the same as a float window: the rounding is really there (in float32, where it shows).
    if lm.dtype == torch.float32:
        plain = Engine(lm, settings.replace(kv_quantize="none"))
        plain_pre, _ = run(plain, plain.new_state(), stream, decode)
        assert not torch.allclose(plain_pre, got_pre, atol=1e-5, rtol=1e-5)


def test_int8_window_stays_close_to_the_float_one(lm):
    stream = ids(60)
    got = Engine(lm, INT8)
    want = Engine(lm, SETTINGS)
    a, da = run(got, got.new_state(), stream, ids(10, seed=2))
    b, db = run(want, want.new_state(), stream, ids(10, seed=2))
    for x, y in ((a, b), (da, db)):
        assert (x - y).abs().max().item() <= 0.05 * y.abs().max().item()


def test_static_forwards_equal_eager_ones(lm):
    stream, decode = ids(23), ids(12, seed=3)
    eager = Engine(lm, INT8, graphs="off")
    static = Engine(lm, INT8, graphs="static")
    a, da = run(eager, eager.new_state(), stream, decode)
    b, db = run(static, static.new_state(), stream, decode)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(da, db, atol=1e-5, rtol=1e-5)


def test_snapshot_restore_and_state_dict_round_trip_bit_identically(lm):
    engine = Engine(lm, INT8)
    state = engine.encode(ids(37), continued=False)
    before = {k: t.clone() for k, t in state.cache.state_dict().items()}
    assert before["layers.0.k_ring"].dtype == torch.int8 and before["layers.0.k_ring_scale"].dtype == torch.bfloat16
    for budget in (4, 40):  # a few slots, or the whole ring across a re-base
        mark = state.snapshot(budget)
        engine.encode(ids(budget - 2, seed=1), state)
        engine.step(state, 7)
        state.restore(mark)
        after = state.cache.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
    # Saved and loaded into a fresh cache, the stream continues as if never interrupted.
    fresh = engine.new_cache()
    fresh.load_state_dict(state.cache.state_dict(), state.cache.meta_state())
    assert all(torch.equal(t, before[k]) for k, t in fresh.state_dict().items())
    p1 = fresh.plan(1)
    x = torch.tensor([[5]])
    want = engine.adapter.forward(x, state.cache, state.cache.plan(1), rows=slice(None))
    got = engine.adapter.forward(x, fresh, p1, rows=slice(None))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_states_of_one_ring_kind_are_refused_by_the_other(lm):
    int8 = Engine(lm, INT8).encode(ids(20), continued=False).cache
    flt = Engine(lm, SETTINGS).encode(ids(20), continued=False).cache
    with pytest.raises(InputError, match="kv-quantize int8"):
        Engine(lm, SETTINGS).new_cache().load_state_dict(int8.state_dict(), int8.meta_state())
    with pytest.raises(InputError, match="int8"):
        Engine(lm, INT8).new_cache().load_state_dict(flt.state_dict(), flt.meta_state())
    bad = dict(int8.state_dict())
    bad["layers.1.v_ring_scale"] = torch.full_like(bad["layers.1.v_ring_scale"], float("inf"))
    with pytest.raises(InputError, match="not finite"):
        Engine(lm, INT8).new_cache().load_state_dict(bad, int8.meta_state())
    del bad["layers.1.v_ring_scale"]
    with pytest.raises(InputError, match="missing"):
        Engine(lm, INT8).new_cache().load_state_dict(bad, int8.meta_state())


def test_bytes_are_what_the_estimate_said_and_about_half(lm):
    int8, flt = Engine(lm, INT8), Engine(lm, SETTINGS)
    a, b = int8.new_cache(), flt.new_cache()
    assert a.nbytes == lm.adapter.cache_bytes(INT8)
    assert b.nbytes == lm.adapter.cache_bytes(SETTINGS)
    ring_a = sum(x.numel() * x.element_size() for layer in a.layers for x in layer.ring.buffers())
    ring_b = sum(x.numel() * x.element_size() for layer in b.layers for x in layer.ring.buffers())
    per_value = 1 + 2 * 2 / 16  # int8, plus a bfloat16 scale for every 16 values (and the padding to 16 slots)
    assert ring_a < ring_b * per_value / lm.dtype.itemsize * 1.3


def test_head_dims_off_the_kernels_block_decode_straight_from_the_ring_too():
    # Scores are integer products (any head dim); p @ V reduces over slots, padded to the kernel's block.
    lm = from_hf(tiny_llama(4, 2, trained=16, layers=2, seed=4), None)  # head_dim 8
    engine = Engine(lm, INT8)
    state = engine.new_state()
    got_pre, got_dec = run(engine, state, ids(30), ids(8, seed=1))
    ref = Engine(lm, SETTINGS)
    want_pre, want_dec = run(ref, fake_int8_state(ref), ids(30), ids(8, seed=1))
    torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-5)
    assert ((got_dec - want_dec).abs().max() / want_dec.abs().max()).item() <= 0.01


def test_bad_values_and_devices_are_refused():
    with pytest.raises(SettingsError, match="kv_quantize"):
        SETTINGS.replace(kv_quantize="int4")
    lm = from_hf(tiny_llama(4, 2, trained=16, layers=2, seed=4), None)
    with pytest.raises(UsageError, match="CPU only"):
        LambdaCache(2, 4, 2, 16, lm.adapter.rope, INT8, device="cuda")
    # Old state headers (no kv_quantize) read as the float window they were.
    assert LambdaSettings.from_dict({k: v for k, v in SETTINGS.to_dict().items() if k != "kv_quantize"}) == SETTINGS


def test_a_saved_int8_state_reopens_with_its_window_and_refuses_another(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    settings = LambdaSettings(n_global=4, n_local=32, limit_distance=64, chunk_size=16, kv_quantize="int8")
    encoded = encode_document(Engine(lm, settings), Document("doc.txt", CORPUS), "tiny")
    path = tmp_path / "doc.lminf"
    save_state(path, encoded.state, encoded.header)
    engine, doc = open_state(path, lm)  # no options: the state's own window
    assert engine.settings.kv_quantize == "int8"
    want = encoded.state.cache.state_dict()
    got = doc.state.cache.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(InputError, match="kv_quantize=int8"):
        open_state(path, lm, {"kv_quantize": "none"})


# Head dims of 16 for the ALiBi families too, so that their per-head biases go through the int8 kernel.
WIDER = {"bloom": {"hidden_size": 96}, "mpt": {"d_model": 64}}


@pytest.mark.parametrize("name", [f.name for f in FAMILIES] + [f"{n}-16" for n in WIDER])
def test_every_family_with_an_int8_window_equals_its_float_one_holding_the_same_rounding(name):
    base = name.removesuffix("-16")
    lm = from_hf(build(base, **WIDER.get(base, {}) if name.endswith("-16") else {}), None)
    stream, decode = ids(27), ids(9, seed=5)
    settings = INT8.replace(n_local=6, limit_distance=8)
    got = Engine(lm, settings)
    state = got.new_state()
    got_pre, got_dec = run(got, state, stream, decode)
    ref = Engine(lm, settings.replace(kv_quantize="none"))
    want_pre, want_dec = run(ref, fake_int8_state(ref), stream, decode)
    torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-5)
    # Decode steps go through the int8 products (the query rounded to int8, p to bfloat16).
    assert ((got_dec - want_dec).abs().max() / want_dec.abs().max()).item() <= 0.01
