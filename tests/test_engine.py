"""The engine against references: the unmodified model inside the window, a naive
dense Λ reference beyond it, chunked == one-shot, constant cache bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_lambda_logits, tiny_llama

from lminf_cli.attention import Rope, lambda_attention
from lminf_cli.errors import UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.sampling import SamplingParams, make_sampler
from lminf_cli.settings import LambdaSettings

HEADS = [pytest.param(4, 2, id="gqa"), pytest.param(4, 4, id="mha"), pytest.param(4, 1, id="mqa")]


def run_chunks(lm, settings, ids, chunk, fused=True):
    """Logits for every position, fed through the engine `chunk` tokens at a time."""
    engine = Engine(lm, settings.replace(chunk_size=chunk), fused=fused)
    cache = engine.new_cache()
    parts = [engine.forward(cache, ids[:, s:s + chunk], rows=slice(None)) for s in range(0, ids.shape[1], chunk)]
    return torch.cat(parts, dim=1), cache


@pytest.mark.parametrize("heads,kv", HEADS)
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_equals_unmodified_model_inside_window(heads, kv, chunk, device):
    model = tiny_llama(heads, kv, trained=16)
    lm = from_hf(model, None)
    ids = torch.randint(0, 97, (1, 16), device=device)
    ours, _ = run_chunks(lm, LambdaSettings.for_model(16, n_global=4), ids, chunk)
    ref = model(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("heads,kv", HEADS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("n_global,n_local,limit", [(3, 8, 12), (0, 8, 8), (5, 6, 6), (10, 4, 16)])
def test_equals_dense_lambda_reference_beyond_window(heads, kv, fused, n_global, n_local, limit, device):
    model = tiny_llama(heads, kv, trained=16)
    lm = from_hf(model, None)
    ids = torch.randint(0, 97, (1, 70), device=device)
    ref = dense_lambda_logits(model, ids, n_local, n_global, limit)
    for chunk in (1, 7, 32):
        ours, cache = run_chunks(lm, LambdaSettings(n_global, n_local, limit), ids, chunk, fused)
        assert torch.allclose(ours, ref, atol=1e-4), (chunk, (ours - ref).abs().max())
        if chunk < 32:
            assert cache.rebases > 0  # long enough to re-base relative positions on the way


@pytest.mark.parametrize("heads,kv", HEADS)
@pytest.mark.parametrize("n_global,n_local,limit,chunk,wraps", [(5, 40, 48, 33, True), (0, 64, 64, 33, True),
                                                                 (3, 50, 60, 45, False)])
def test_split_local_branch_equals_dense_reference(heads, kv, n_global, n_local, limit, chunk, wraps, device,
                                                   monkeypatch):
    # CPU prefill cuts a full window into unmasked spans and masked edges (LocalSplit):
    # the same keys under the same rule, so the same logits as the dense reference.
    from lminf_cli.cache import LambdaCache

    seen = []
    build = LambdaCache._local_split

    def recording(self, start, n_new):
        split = build(self, start, n_new)
        seen.append(None if split is None else len(split.spans))
        return split

    monkeypatch.setattr(LambdaCache, "_local_split", recording)
    model = tiny_llama(heads, kv, trained=16)
    lm = from_hf(model, None)
    ids = torch.randint(0, 97, (1, 400), device=device)
    ref = dense_lambda_logits(model, ids, n_local, n_global, limit)
    ours, _ = run_chunks(lm, LambdaSettings(n_global, n_local, limit), ids, chunk)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    if device.type == "cpu":
        # The window filling (no split), one unmasked span, and (where the ring wraps there) two.
        assert None in seen and 1 in seen and (2 in seen) == wraps
    else:
        assert set(seen) == {None}  # other kernels take the mask as it is


def test_unmodified_model_diverges_from_lambda_beyond_window(device):
    # Guards the reference itself: beyond the window the two rules must differ.
    model = tiny_llama(4, 2, trained=16)
    ids = torch.randint(0, 97, (1, 40), device=device)
    ref = dense_lambda_logits(model, ids, 8, 3, 12)
    assert (ref[:, 20:] - model(ids).logits[:, 20:]).abs().max() > 1e-2
    assert torch.allclose(ref[:, :8], model(ids).logits[:, :8], atol=1e-4)


def test_chunked_nll_equals_one_shot(device):
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    ids = torch.randint(0, 97, (1, 90), device=device)
    settings = LambdaSettings(4, 12, 16)
    one_shot = Engine(lm, settings.replace(chunk_size=90)).token_nll(ids)
    for chunk in (1, 3, 13, 64):
        chunked = Engine(lm, settings.replace(chunk_size=chunk)).token_nll(ids)
        assert torch.allclose(chunked, one_shot, atol=1e-4), chunk
    assert one_shot.shape == (89,)


def test_prefill_then_decode_equals_prefill_of_all(device):
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    ids = torch.randint(0, 97, (1, 50), device=device)
    settings = LambdaSettings(4, 12, 16)
    engine = Engine(lm, settings.replace(chunk_size=16))
    state = engine.encode(ids[0, :-1])
    stepped = engine.step(state, int(ids[0, -1]))
    full = engine.encode(ids[0]).logits
    assert torch.allclose(stepped, full, atol=1e-4)


def test_cache_bytes_constant_and_positions_bounded(device):
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    settings = LambdaSettings(4, 16, 16)
    engine = Engine(lm, settings.replace(chunk_size=8))
    state = engine.encode(torch.randint(0, 97, (16,)))
    bytes_1x = state.cache.nbytes
    engine.encode(torch.randint(0, 97, (9 * 16,)), state=state)
    for _ in range(40):
        engine.step(state, 5)
    assert state.n_tokens == 10 * 16 + 40
    assert state.cache.nbytes == bytes_1x
    # Relative positions never exceed about two rings plus a chunk, at any length.
    assert state.cache.max_relative_position < 2 * state.cache.ring_size + 8
    assert state.cache.rebases >= 3


def test_far_positions_do_not_lose_precision(device):
    # A stream that has run for 10M tokens behaves like a fresh one with the same
    # window contents: relative positions are re-based, never absolute.
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    settings = LambdaSettings(0, 8, 8)  # pure window: outputs depend only on the last 8 tokens
    ids = torch.randint(0, 97, (1, 40), device=device)
    engine = Engine(lm, settings.replace(chunk_size=4))
    fresh = engine.new_cache()
    far = engine.new_cache()
    far.length = far.base = 10_000_000  # as if 10M tokens had streamed past
    a = torch.cat([engine.forward(fresh, ids[:, s:s + 4], rows=slice(None)) for s in range(0, 40, 4)], 1)
    b = torch.cat([engine.forward(far, ids[:, s:s + 4], rows=slice(None)) for s in range(0, 40, 4)], 1)
    # Two layers x 8-token window: from token 16 on, nothing before the stream start reaches.
    assert torch.allclose(a[:, 16:], b[:, 16:], atol=1e-5)


@pytest.mark.parametrize("n_local", [2100, 4096], ids=["past-window", "inside-window"])
def test_decode_steps_over_a_long_window_equal_dense_reference(n_local, device, monkeypatch):
    # A decode step on the CPU reads its window unmasked, cut into pieces of >= 1024 keys run
    # as one batched call (attention._span_attention).  Past the window the ring wraps, so the
    # window is two spans for most steps and the global branch joins; inside it, the pieces
    # are the whole softmax.  Same keys, same rule: the dense reference's logits.
    from lminf_cli import attention

    pieces = []
    kernel = attention.attention_with_lse

    def recording(q, *args, **kwargs):
        pieces.append(q.shape[0])  # the batch of one call: its pieces
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(attention, "attention_with_lse", recording)
    model = tiny_llama(4, 2, trained=16, layers=1)
    lm = from_hf(model, None)
    ids = torch.randint(0, 97, (1, 2230), device=device)
    n_global, limit, chunk = 4, n_local, 64
    ref = dense_lambda_logits(model, ids, n_local, n_global, limit)[:, -30:]
    engine = Engine(lm, LambdaSettings(n_global, n_local, limit, chunk_size=chunk))
    state = engine.encode(ids[0, :-30])
    steps = torch.stack([engine.step(state, int(t)) for t in ids[0, -30:]])[None]  # logits after each token
    assert torch.allclose(steps, ref, atol=1e-4), (steps - ref).abs().max()
    if device.type == "cpu":
        assert max(pieces) == 2  # 2,100-2,230 keys: two pieces


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_split_pieces_equal_the_masked_branch(dtype, tol):
    # lambda_attention with the window as spans (long ones in pieces) against the same keys
    # under a 0/-inf mask, for a decode step's 3 folded rows and for 1 row per head.
    from lminf_cli.attention import LocalSplit

    torch.manual_seed(2)
    n, ring = 5000, 5200
    for heads, kv in ((9, 3), (2, 2)):
        q, qg = torch.randn(1, heads, 1, 64, dtype=dtype), torch.randn(1, heads, 1, 64, dtype=dtype)
        k, v = torch.randn(1, kv, ring, 64, dtype=dtype), torch.randn(1, kv, ring, 64, dtype=dtype)
        kg, vg = torch.randn(1, kv, 4, 64, dtype=dtype), torch.randn(1, kv, 4, 64, dtype=dtype)
        g = heads // kv
        gb = torch.zeros(g, 4, dtype=dtype)
        spans = ((4500, ring), (0, n - (ring - 4500)))          # the window wraps around the ring end
        visible = torch.zeros(ring, dtype=torch.bool)
        for a, e in spans:
            visible[a:e] = True
        lb = torch.zeros(g, ring, dtype=dtype).masked_fill(~visible, float("-inf"))
        none = torch.zeros(0, dtype=torch.long)
        split = LocalSplit(spans, none, torch.zeros(g, 0, dtype=dtype))
        a = lambda_attention(q, qg, k, v, None, kg, vg, gb, 0.125, split=split)
        b = lambda_attention(q, qg, k, v, lb, kg, vg, gb, 0.125, fused=False)
        assert torch.allclose(a.float(), b.float(), atol=tol), (heads, (a.float() - b.float()).abs().max())


def test_lambda_attention_fused_equals_eager():
    torch.manual_seed(1)
    q, qg = torch.randn(1, 6, 5, 8), torch.randn(1, 6, 5, 8)
    k, v = torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    kg, vg = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    lb = torch.zeros(15, 11).masked_fill(torch.rand(15, 11) > 0.6, float("-inf"))
    lb[:, 0] = 0  # every row sees at least one local key
    gb = torch.zeros(15, 3).masked_fill(torch.rand(15, 3) > 0.5, float("-inf"))
    a = lambda_attention(q, qg, k, v, lb, kg, vg, gb, 0.3, fused=True)
    b = lambda_attention(q, qg, k, v, lb, kg, vg, gb, 0.3, fused=False)
    # Reference: one softmax over both branches with repeated KV heads.
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    kgr, vgr = kg.repeat_interleave(3, 1), vg.repeat_interleave(3, 1)
    s = torch.cat([q @ kr.transpose(-1, -2) + lb.view(3, 5, 11).repeat(2, 1, 1)[None] / 0.3,
                   qg @ kgr.transpose(-1, -2) + gb.view(3, 5, 3).repeat(2, 1, 1)[None] / 0.3], -1) * 0.3
    ref = torch.softmax(s, -1) @ torch.cat([vr, vgr], 2)
    assert torch.allclose(a, ref, atol=1e-5) and torch.allclose(b, ref, atol=1e-5)


def test_rope_interleaved_and_partial_match_complex_rotation():
    inv = 1.0 / (100.0 ** (torch.arange(0, 4) / 4))
    x = torch.randn(3, 10)
    pos = torch.tensor([0, 5, 123])
    for interleaved in (False, True):
        rope = Rope(inv, head_dim=10, rotary_dim=8, interleaved=interleaved)
        cos, sin = rope.cos_sin(pos, torch.device("cpu"), torch.float32)
        y = rope.rotate(x, cos, sin)
        if interleaved:
            z = torch.view_as_complex(x[:, :8].reshape(3, 4, 2).contiguous())
        else:
            z = torch.complex(x[:, :4], x[:, 4:8])
        z = z * torch.polar(torch.ones(3, 4), pos[:, None].float() * inv[None])
        expect = torch.view_as_real(z).reshape(3, 8) if interleaved else torch.cat([z.real, z.imag], -1)
        assert torch.allclose(y[:, :8], expect, atol=1e-4)
        assert torch.equal(y[:, 8:], x[:, 8:])
        # The decode path applies the same rotation as one matrix product.
        one = rope.cos_sin(torch.tensor([77]), torch.device("cpu"), torch.float32)
        assert torch.allclose(x @ rope.matrix(*one), rope.rotate(x, *one), atol=1e-5)


def test_settings_defaults_and_validation():
    s = LambdaSettings.for_model(8192)
    assert (s.n_global, s.n_local, s.limit_distance) == (100, 8192, 8192)
    for bad in (dict(n_local=0), dict(n_local=-5), dict(limit_distance=0), dict(n_global=-1),
                dict(n_local=9000)):
        with pytest.raises(UsageError):
            LambdaSettings.for_model(8192, **bad)


def test_sampler():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert make_sampler(SamplingParams(), torch.device("cpu"))(logits) == 1
    assert make_sampler(SamplingParams(temperature=1.0, top_k=1, seed=3), torch.device("cpu"))(logits) == 1
    draws = {make_sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=s), torch.device("cpu"))(logits)
             for s in range(30)}
    assert draws <= {1, 3} and len(draws) == 2
    a = [make_sampler(SamplingParams(temperature=2.0, seed=7), torch.device("cpu"))(logits) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    with pytest.raises(UsageError):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("alibi", [False, True])
def test_joint_few_rows_equals_two_branch_merge(rows, alibi, device):
    from lminf_cli.attention import joint_few_rows

    g = torch.Generator().manual_seed(rows)
    hkv, n, glob, d = 3, 50, 7, 16
    ql, qg = (torch.randn(1, hkv, rows, d, generator=g).to(device) for _ in range(2))
    kl, vl = (torch.randn(1, hkv, n, d, generator=g).to(device) for _ in range(2))
    kg, vg = (torch.randn(1, hkv, glob, d, generator=g).to(device) for _ in range(2))
    lb = torch.zeros(rows, n, device=device)
    lb[:, : n // 3] = float("-inf")                 # old slots out of the window
    gb = torch.zeros(rows, glob, device=device)
    gb[0, 2:] = float("-inf")                       # a row that sees only some global keys
    if alibi:  # per-head biases, as ALiBi models pass them
        lb = lb - torch.rand(1, hkv, rows, n, generator=g).to(device)
        gb = gb - torch.rand(1, hkv, rows, glob, generator=g).to(device)
    got = joint_few_rows(ql, qg, kl, vl, lb, kg, vg, gb, 0.25)
    want = lambda_attention(ql, qg, kl, vl, lb, kg, vg, gb, 0.25, fused=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
