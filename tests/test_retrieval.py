"""Top-k middle retrieval against a dense reference of the rule, and its store."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICE, lambda_masks, rope_at, tiny_llama

from lminf_cli.errors import UsageError
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.retrieval import MiddleStore
from lminf_cli.settings import LambdaSettings


@torch.no_grad()
def dense_topk_logits(model, ids, n_local, n_global, limit, top_k, from_layer, distance, rows):
    """Λ rule for every row; rows in `rows` (in layers >= from_layer) also attend to the
    top_k middle tokens (n_global <= j <= i - n_local) per head, scored at `distance`."""
    n, h, hkv, d, local, glob, middle = lambda_masks(model, ids, n_local, n_global)
    x = model.model.embed_tokens(ids)
    chosen = {}
    for li, layer in enumerate(model.model.layers):
        a = layer.self_attn
        hs = layer.input_layernorm(x)
        q = a.q_proj(hs).view(1, n, h, d).transpose(1, 2)
        k = a.k_proj(hs).view(1, n, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, 1)
        v = a.v_proj(hs).view(1, n, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, 1)
        k0 = rope_at(model, k, [0] * n)
        s_local = rope_at(model, q, range(n)) @ rope_at(model, k, range(n)).transpose(-1, -2)
        s_glob = rope_at(model, q, [limit] * n) @ k0.transpose(-1, -2)
        s_mid = rope_at(model, q, [distance] * n) @ k0.transpose(-1, -2)
        inf = torch.tensor(float("-inf"))
        scores = torch.where(local, s_local, torch.where(glob, s_glob, inf))
        if li >= from_layer:
            for r in rows:
                cand = s_mid[0, :, r].masked_fill(~middle[r], float("-inf"))        # [h, n]
                kk = min(top_k, int(middle[r].sum()))
                if kk == 0:
                    continue
                best = torch.topk(cand, kk, dim=-1)                                  # [h, kk]
                top = best.indices
                chosen[(li, r)] = best.values                                        # their scores, best first
                for head in range(h):
                    scores[0, head, r, top[head]] = s_mid[0, head, r, top[head]]
        p = torch.softmax(scores / d ** 0.5, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(1, n, h * d)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x)), chosen


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("fused", [True, False])
def test_prefill_and_decode_equal_dense_topk_reference(heads, kv, fused):
    model = tiny_llama(heads, kv, trained=16, layers=3, seed=2)
    lm = from_hf(model, None)
    settings = LambdaSettings.for_model(16, n_global=3, n_local=8, limit_distance=12, middle_top_k=5,
                                        middle_from_layer=1, middle_distance=4)
    # Many blocks (exercise the bounds), exact search, a float32 store: the rule itself, to 1e-4.
    settings = LambdaSettings(**{**settings.__dict__, "middle_block": 4, "middle_blocks": 0,
                                 "middle_dtype": "float32"})
    ids = torch.randint(0, 97, (1, 120)).to(DEVICE)
    prompt, n_decode = 100, 20
    ref, chosen = dense_topk_logits(model, ids, 8, 3, 12, 5, 1, 4, rows=list(range(prompt - 1, 120)))
    picked = []  # what the engine's stores returned, call by call: layers 1 and 2 for each row
    search = MiddleStore.top_k

    def recording(store, *args, **kw):
        out = search(store, *args, **kw)
        picked.append(out[0])
        return out

    for chunk in (7, 32):
        picked.clear()
        engine = Engine(lm, settings.replace(chunk_size=chunk), fused=fused)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MiddleStore, "top_k", recording)
            state = engine.encode(ids[0, :prompt])
            assert torch.allclose(state.logits, ref[0, prompt - 1], atol=1e-4)
            for t in range(prompt, prompt + n_decode):
                logits = engine.step(state, int(ids[0, t]))
                assert torch.allclose(logits, ref[0, t], atol=1e-4), (chunk, t)
        # The selected tokens: every head's k best middle scores, equal to the reference's choice.
        want = [chosen[(layer, r)] for r in range(prompt - 1, prompt + n_decode) for layer in (1, 2)]
        assert len(picked) == len(want)
        for got, ref_scores in zip(picked, want, strict=True):
            assert torch.allclose(got, ref_scores.to(got), atol=1e-4)
        # Only the layers that retrieve keep a store; the window cache itself did not grow.
        assert [layer.middle is not None for layer in state.cache.layers] == [False, True, True]
        assert state.cache.layers[1].middle.length == 120 - 8 - 3


def test_topk_changes_the_answer_only_where_it_should():
    # Sanity of the reference: without retrieval rows the rule is plain Λ-attention.
    model = tiny_llama(4, 2, trained=16, layers=2, seed=3)
    ids = torch.randint(0, 97, (1, 60)).to(DEVICE)
    plain, _ = dense_topk_logits(model, ids, 8, 3, 12, 5, 0, 4, rows=[])
    with_rows, chosen = dense_topk_logits(model, ids, 8, 3, 12, 5, 0, 4, rows=[59])
    assert torch.allclose(plain[0, :59], with_rows[0, :59], atol=1e-6)
    assert (plain[0, 59] - with_rows[0, 59]).abs().max() > 1e-3
    assert chosen[(0, 59)].shape == (4, 5)  # the scores of each head's 5 picks


def test_store_top_k_is_exact_and_reads_few_blocks():
    torch.manual_seed(0)
    store = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                        dtype=torch.float32)
    keys = torch.randn(2, 1000, 16)
    keys[1, 517] *= 8  # a standout key
    for s in range(0, 1000, 77):  # uneven appends: partial tail blocks
        store.append(keys[:, s:s + 77], keys[:, s:s + 77] * 2)
    assert store.length == 1000 and store.n_blocks == 32
    q = torch.randn(4, 16)
    q[2:] = keys[1, 517]  # heads 2, 3 read KV head 1
    scores, k, v = store.top_k(q, 6, groups=2)
    exact = torch.einsum("hd,hnd->hn", q, keys.repeat_interleave(2, 0))
    assert torch.allclose(scores, torch.topk(exact, 6, dim=1).values, atol=1e-5)
    assert torch.allclose(v, 2 * k)
    assert torch.equal(k[2, 0], keys[1, 517])
    # Every query head of both paths: the bounds settle it (few blocks read) or one scan does.
    for trial in range(20):
        q = torch.randn(4, 16) * (1 + trial)
        if trial % 2:
            q[:2], q[2:] = keys[0, 40 * trial], keys[1, 33 * trial] * 4
        scores, k, v = store.top_k(q, 5, groups=2)
        exact = torch.einsum("hd,hnd->hn", q, keys.repeat_interleave(2, 0))
        assert torch.allclose(scores, torch.topk(exact, 5, dim=1).values, atol=1e-4)
        assert torch.allclose(torch.einsum("hd,hkd->hk", q, k), scores, atol=1e-4) and torch.allclose(v, 2 * k)
    assert store.reads["scans"] > 0  # random keys: box bounds in 16 dims are loose
    # Keys that cluster (one block far ahead of the rest): the bounds settle it, reading 2 blocks per head.
    sharp = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                        dtype=torch.float32)
    keys = torch.randn(2, 1000, 16) * 0.01
    keys[:, 300:310] += torch.randn(2, 1, 16)
    sharp.append(keys, -keys)
    q = keys[:, 305].repeat_interleave(2, 0) * 3                                # [4, 16]
    scores, k, v = sharp.top_k(q, 5, groups=2)
    exact = torch.einsum("hd,hnd->hn", q, keys.repeat_interleave(2, 0))
    assert torch.allclose(scores, torch.topk(exact, 5, dim=1).values, atol=1e-5) and torch.allclose(v, -k)
    assert sharp.reads == {"blocks": 8, "scans": 0}


def _best_in_blocks(keys, q, bounds, top, block, k):
    """Exact top-k scores of q over the tokens of the union of each bound row's `top` best blocks."""
    blocks = torch.cat([torch.topk(b, top).indices for b in bounds]).unique()
    toks = (blocks[:, None] * block + torch.arange(block)).flatten()
    return torch.topk(keys[toks] @ q, k).values


def test_bounded_search_reads_at_most_its_blocks_and_is_exact_within_them():
    torch.manual_seed(1)
    store = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                        dtype=torch.float32)
    keys = torch.randn(2, 2000, 16)
    store.append(keys, keys * 3)
    nb = store.n_blocks
    for trial in range(10):
        q = torch.randn(4, 16) * (1 + trial)
        scores, k, v = store.top_k(q, 5, groups=2, max_blocks=6)
        kv = torch.arange(4) // 2
        # The pool of a KV head (6 blocks) holds both its heads' top-3 blocks and lies within their top-6,
        # so each head's answer is bracketed by the exact top-5 over those two sets.
        bound = torch.maximum(q[:, None] * store.kmax[kv], q[:, None] * store.kmin[kv]).sum(-1)   # [4, nb]
        assert torch.allclose(store.bounds(q, 2), bound, atol=1e-4)
        for h in range(4):
            mates = [2 * int(kv[h]), 2 * int(kv[h]) + 1]
            lo, hi = (_best_in_blocks(keys[kv[h]], q[h], bound[mates], top, 32, 5) for top in (3, 6))
            tol = 1e-5 * scores[h].abs() + 1e-5
            assert (scores[h] >= lo - tol).all() and (scores[h] <= hi + tol).all()
        assert torch.allclose(torch.einsum("hd,hkd->hk", q, k), scores, atol=1e-4) and torch.allclose(v, 3 * k)
    assert store.reads == {"blocks": 10 * 2 * 6, "scans": 0} and nb == 63  # 6 blocks per KV head, never a scan
    # A standout key sits in a block whose bound ranks first: the bounded search finds it.
    keys[1, 1234] *= 10
    sharp = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                        dtype=torch.float32)
    sharp.append(keys, keys)
    scores, k, _ = sharp.top_k(keys[1, 1234].expand(4, 16), 1, groups=2, max_blocks=2)
    assert torch.equal(k[2, 0], keys[1, 1234]) and torch.equal(k[3, 0], keys[1, 1234])


def test_half_precision_store_halves_the_bytes_and_returns_float32():
    torch.manual_seed(2)
    keys = torch.randn(2, 500, 16)
    full, half = (MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                              dtype=dt) for dt in (torch.float32, torch.float16))
    for s in (full, half):
        s.append(keys, -keys)
    assert half.store_nbytes * 2 == full.store_nbytes
    q = torch.randn(4, 16)
    for blocks in (0, 4):
        (s32, k32, v32), (s16, k16, v16) = full.top_k(q, 5, 2, blocks), half.top_k(q, 5, 2, blocks)
        assert k16.dtype == v16.dtype == s16.dtype == torch.float32
        assert torch.allclose(s16, s32, atol=1e-2) and torch.allclose(k16, k32, atol=1e-2)
        assert torch.allclose(v16, v32, atol=1e-2)
    settings = LambdaSettings.for_model(16, middle_top_k=5)
    assert settings.store_dtype(torch.float32) == torch.float16
    assert settings.store_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(UsageError, match="middle_dtype"):
        LambdaSettings.for_model(16, middle_top_k=5, middle_dtype="int3")
    with pytest.raises(UsageError, match="middle_blocks"):
        LambdaSettings.for_model(16, middle_top_k=5, middle_blocks=-1)


def test_token_by_token_appends_keep_the_same_summaries_as_one_append():
    # Decode steps widen the tail block's box in place; the result must equal summarising from scratch.
    torch.manual_seed(4)
    keys = torch.randn(2, 300, 16) * 3
    for dtype in (torch.float32, torch.float16):
        bulk, steps = (MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"),
                                   store_device=torch.device("cpu"), dtype=dtype) for _ in range(2))
        bulk.append(keys, -keys)
        steps.append(keys[:, :45], -keys[:, :45])  # a partial block first, as after an encode
        for t in range(45, 300):
            steps.append(keys[:, t:t + 1], -keys[:, t:t + 1])
        assert torch.equal(steps.kmax, bulk.kmax) and torch.equal(steps.kmin, bulk.kmin)
        assert steps.n_blocks == bulk.n_blocks == 10
        steps.truncate(100)  # undo into the middle of a block, then step again
        bulk.truncate(100)
        for t in range(100, 140):
            steps.append(keys[:, t:t + 1], keys[:, t:t + 1])
        bulk.append(keys[:, 100:140], keys[:, 100:140])
        assert torch.equal(steps.kmax, bulk.kmax) and torch.equal(steps.kmin, bulk.kmin)
        q = torch.randn(4, 16)
        assert all(torch.equal(a, b) for a, b in zip(steps.top_k(q, 5, 2, 3), bulk.top_k(q, 5, 2, 3), strict=True))


def test_int8_store_quarter_bytes_close_answers_and_valid_bounds(tmp_path):
    torch.manual_seed(5)
    keys = torch.randn(2, 700, 16) * torch.rand(2, 700, 1) * 4
    full, small = (MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                               dtype=dt) for dt in (torch.float32, torch.int8))
    for store in (full, small):
        store.append(keys[:, :650], -keys[:, :650] + 1)
        for t in range(650, 700):  # decode-style appends widen the tail box from the dequantized keys
            store.append(keys[:, t:t + 1], -keys[:, t:t + 1] + 1)
    # int8 data plus a float32 scale per token and head: 16 + 4 bytes against 64.
    assert small.store_nbytes * 64 == full.store_nbytes * 20
    deq = small.keys(0, 700)
    assert (deq - keys).abs().max() <= keys.abs().amax(-1, keepdim=True).max() / 127 * 0.5 + 1e-6
    # The summaries bound the stored (dequantized) keys, so the exact search stays exact for them.
    def boxes(x):  # per 32-token block: [max | min] over its tokens
        spans = [x[:, a:a + 32] for a in range(0, x.shape[1], 32)]
        return torch.stack([b.amax(1) for b in spans], 1), torch.stack([b.amin(1) for b in spans], 1)

    assert all(torch.equal(a, b) for a, b in zip((small.kmax, small.kmin), boxes(deq), strict=True))
    q = torch.randn(4, 16)
    s8, k8, v8 = small.top_k(q, 5, 2, 0)
    exact = torch.einsum("hd,hnd->hn", q, deq.repeat_interleave(2, 0))
    assert torch.allclose(s8, torch.topk(exact, 5, dim=1).values, atol=1e-4)
    assert torch.allclose(torch.einsum("hd,hkd->hk", q, k8), s8, atol=1e-4)
    for blocks_read in (0, 4):
        (s32, _, _), (s8, k8, v8) = full.top_k(q, 5, 2, blocks_read), small.top_k(q, 5, 2, blocks_read)
        assert s8.dtype == k8.dtype == v8.dtype == torch.float32
        # The best scores of the float32 store, to the rounding of the keys; each value its key's, to its own.
        assert torch.allclose(s8, s32, rtol=0.02, atol=0.05)
        step = (k8.abs().amax(-1, keepdim=True) + 1) / 127                         # [4, 5, 1]
        assert ((v8 - (1 - k8)).abs() <= step).all()
    spilled = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                          dtype=torch.int8, spill_dir=str(tmp_path))
    spilled.append(keys, -keys + 1)
    assert all(torch.equal(a, b) for a, b in zip(spilled.top_k(q, 5, 2, 4), small.top_k(q, 5, 2, 4), strict=True))
    small.truncate(100)  # a checkpoint's undo: the tail block's box shrinks back
    assert all(torch.equal(a, b) for a, b in zip((small.kmax, small.kmin), boxes(deq[:, :100]), strict=True))


def test_memory_mapped_store_equals_the_ram_store_and_leaves_no_files(tmp_path):
    torch.manual_seed(3)
    keys = torch.randn(2, 900, 16)
    ram = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                      dtype=torch.float16)
    mapped = MiddleStore(2, 16, block=32, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                         dtype=torch.float16, spill_dir=str(tmp_path))
    for s in range(0, 900, 101):  # several growths: the mapping is widened in place
        for store in (ram, mapped):
            store.append(keys[:, s:s + 101], keys[:, s:s + 101] + 1)
    assert mapped.spilled and not ram.spilled and mapped.length == ram.length == 900
    assert torch.equal(mapped.k[:, :900], ram.k[:, :900]) and torch.equal(mapped.v[:, :900], ram.v[:, :900])
    q = torch.randn(4, 16)
    for blocks in (0, 5):
        got, want = mapped.top_k(q, 5, 2, blocks), ram.top_k(q, 5, 2, blocks)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for store in (ram, mapped):  # a checkpoint's undo, then new tokens over the old ones
        store.truncate(300)
        store.append(keys[:, :50], keys[:, :50])
    assert torch.equal(mapped.kmax, ram.kmax) and torch.equal(mapped.k[:, :350], ram.k[:, :350])
    if os.path.exists("/proc/self/fd"):
        assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up, even after a crash
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    ids = torch.randint(0, 97, (200,))
    outs = []
    for where in (None, str(tmp_path)):
        settings = LambdaSettings.for_model(16, n_global=2, n_local=8, middle_top_k=3, middle_from_layer=0,
                                            middle_dir=where)
        engine = Engine(lm, settings.replace(chunk_size=8))
        state = engine.encode(ids)
        outs.append([state.logits] + [engine.step(state, t) for t in (5, 6, 7)])
        assert state.cache.layers[0].middle.spilled == (where is not None)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    with pytest.raises(UsageError, match="middle_dir"):
        LambdaSettings.for_model(16, middle_top_k=3, middle_dir=str(tmp_path / "missing"))


def test_store_bytes_stay_off_the_window_cache():
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    settings = LambdaSettings.for_model(16, n_global=2, n_local=8, middle_top_k=3, middle_from_layer=0)
    engine = Engine(lm, settings.replace(chunk_size=8))
    state = engine.encode(torch.randint(0, 97, (40,)))
    window_bytes, store_bytes = state.cache.nbytes, state.cache.middle_nbytes
    engine.encode(torch.randint(0, 97, (400,)), state=state)
    assert state.cache.nbytes == window_bytes          # the fast cache is constant
    assert state.cache.middle_nbytes > store_bytes      # the store holds the middle
    for layer in state.cache.layers:
        assert layer.middle.k.device.type == "cpu"      # host memory, off the hot path


def test_settings_validation():
    with pytest.raises(UsageError):
        LambdaSettings.for_model(16, middle_top_k=-1)
    with pytest.raises(UsageError):
        LambdaSettings.for_model(16, middle_distance=99)
    assert LambdaSettings.for_model(16).middle_top_k == 0
    assert LambdaSettings.for_model(16, n_local=8).middle_distance == 2  # L/8


def test_retrieval_recipe_and_its_overrides():
    s = LambdaSettings.for_model(8192, retrieval=True)
    assert (s.n_local, s.limit_distance, s.middle_top_k, s.middle_from_layer, s.middle_distance) == \
        (4096, 4096, 5, 4, 1024)
    assert (s.middle_blocks, s.middle_dtype, s.n_global) == (16, "auto", 100)
    s = LambdaSettings.for_model(8192, retrieval=True, n_local=2048, middle_top_k=16, middle_distance=512)
    assert (s.n_local, s.limit_distance, s.middle_top_k, s.middle_distance) == (2048, 4096, 16, 512)
    assert LambdaSettings.for_model(8192, retrieval=True, limit_distance=8192).n_local == 8192
    assert LambdaSettings.for_model(8192) == LambdaSettings.for_model(8192, retrieval=False)


def _engine_with_retrieval(tiny_model_dir):
    from lminf_cli.models import load_model
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    settings = LambdaSettings.for_model(64, n_global=4, n_local=16, middle_top_k=3, middle_from_layer=1)
    return Engine(lm, settings.replace(chunk_size=8))


def test_saved_state_carries_the_middle_store(tiny_model_dir, tmp_path):
    from lminf_cli.state_io import build_header, load_state, read_header, save_state
    engine = _engine_with_retrieval(tiny_model_dir)
    ids = torch.randint(0, 200, (150,))
    state = engine.encode(ids)
    header = build_header(engine, state, str(tiny_model_dir), "fp", "doc", "sha", 150, 600, None)
    save_state(tmp_path / "s.lminf", state, header)
    loaded = load_state(tmp_path / "s.lminf", engine, read_header(tmp_path / "s.lminf"), "fp")
    assert loaded.cache.layers[1].middle.length == state.cache.layers[1].middle.length == 150 - 16 - 4
    fresh = list(engine.generate_ids(engine.encode(ids), 12))
    assert list(engine.generate_ids(loaded, 12)) == fresh
    assert list(engine.generate_ids(state, 12)) == fresh
    assert read_header(tmp_path / "s.lminf").settings.middle_dtype == "auto"
    assert loaded.cache.layers[1].middle.dtype == torch.float16
    # A store written in another precision (e.g. bfloat16 on a GPU) loads into this one's.
    wide = Engine(engine.lm, engine.settings.replace(middle_dtype="float32"))
    other = wide.encode(ids)
    save_state(tmp_path / "w.lminf", other, build_header(wide, other, str(tiny_model_dir), "fp", "doc", "sha",
                                                          150, 600, None))
    moved = load_state(tmp_path / "w.lminf", engine, read_header(tmp_path / "w.lminf"), "fp")
    assert moved.cache.layers[1].middle.dtype == torch.float16
    n = moved.cache.layers[1].middle.length  # loaded has since generated 12 more tokens
    assert torch.equal(moved.cache.layers[1].middle.k[:, :n], loaded.cache.layers[1].middle.k[:, :n])
    # An int8 store travels as int8 with its scales, and comes back the same.
    tight = Engine(engine.lm, engine.settings.replace(middle_dtype="int8"))
    packed = tight.encode(ids)
    save_state(tmp_path / "q.lminf", packed, build_header(tight, packed, str(tiny_model_dir), "fp", "doc", "sha",
                                                          150, 600, None))
    assert (tmp_path / "q.lminf").stat().st_size < (tmp_path / "s.lminf").stat().st_size
    back = load_state(tmp_path / "q.lminf", tight, read_header(tmp_path / "q.lminf"), "fp")
    a, b = back.cache.layers[1].middle, packed.cache.layers[1].middle
    assert a.dtype == torch.int8 and torch.equal(a.k[:, :a.length], b.k[:, :b.length])
    assert torch.allclose(a.keys(0, a.length), b.keys(0, b.length), rtol=1e-6, atol=0)
    assert list(tight.generate_ids(back, 12)) == list(tight.generate_ids(packed, 12))


def test_checkpoint_restore_undoes_middle_appends(tiny_model_dir):
    engine = _engine_with_retrieval(tiny_model_dir)
    ids = torch.randint(0, 200, (100,))
    state = engine.encode(ids)
    before = [layer.middle.length if layer.middle else 0 for layer in state.cache.layers]
    kmin = state.cache.layers[1].middle.kmin.clone()
    cp = state.snapshot(60)
    engine.encode(torch.randint(0, 200, (30,)), state=state)
    list(engine.generate_ids(state, 10))
    state.restore(cp)
    assert [layer.middle.length if layer.middle else 0 for layer in state.cache.layers] == before
    assert torch.equal(state.cache.layers[1].middle.kmin, kmin)
    assert list(engine.generate_ids(state, 8)) == list(engine.generate_ids(engine.encode(ids), 8))


def test_retrieval_settings_switched_on_an_encoded_stream_equal_fresh_engines():
    # One stream, encoded with stores for every layer, then asked under other settings:
    # each answer equals an engine built with those settings from the start.
    model = tiny_llama(4, 2, trained=16, layers=3, seed=5)
    lm = from_hf(model, None)
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(5)).tolist()

    def settings(k, layer, dist):
        return LambdaSettings.for_model(16, n_global=3, n_local=8, limit_distance=12, middle_top_k=k,
                                        middle_from_layer=layer, middle_distance=dist)

    def run(engine, state, tail):
        logits = [engine.encode(tail, state=state).logits.clone()]
        for t in (7, 8, 9):
            logits.append(engine.step(state, t).clone())
        return torch.stack(logits)

    shared = Engine(lm, settings(5, 0, 4).replace(chunk_size=8))
    # The prefix's last row must not retrieve (in one encode it is not last); 88 is a chunk
    # boundary of the one-shot encode of all 90 tokens.
    state = shared.encode(ids[:88], continued=False)
    mark = state.snapshot(16)
    answers = []
    for k, layer, dist in [(0, 0, 4), (5, 1, 4), (2, 2, 10), (5, 0, 4)]:
        state.cache.set_retrieval(k, layer, dist)
        got = run(shared, state, ids[88:])
        state.restore(mark)
        fresh = Engine(lm, settings(k, layer, dist).replace(chunk_size=8))
        want = run(fresh, fresh.encode([]), ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        answers.append(got)
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(answers) for b in answers[i + 1:])
    with pytest.raises(UsageError):
        Engine(lm, settings(0, 0, 4).replace(chunk_size=8)).new_cache().set_retrieval(5)
    with pytest.raises(UsageError):
        Engine(lm, settings(5, 2, 4).replace(chunk_size=8)).new_cache().set_retrieval(5, from_layer=1)


def test_sectioned_encode_equals_one_shot_with_retrieval_on(tiny_model_dir):
    # Only the row that will be continued retrieves, and a document's last row never is (a
    # prompt follows it): however the document is cut into sections, the state is the same.
    from conftest import CORPUS

    from lminf_cli.documents import Document
    from lminf_cli.tasks import ask, encode_document

    # Retrieval from layer 0: a retrieving row changes what layer 1 stores, so the old rule shows.
    engine = _engine_with_retrieval(tiny_model_dir)
    engine = Engine(engine.lm, engine.settings.replace(middle_from_layer=0))  # chunk 8, window 16, top-k 3
    ids = torch.randint(0, 200, (203,), generator=torch.Generator().manual_seed(9))
    one = engine.encode(ids, continued=False)
    assert one.cache.layers[0].middle.length > 150
    # Sections that end on chunk boundaries run the very same forwards: bit for bit.
    for cut in (8, 96, 200):
        two = engine.encode(ids[:cut], continued=False)
        engine.encode(ids[cut:], two, continued=False)
        a, b = one.cache.state_dict(), two.cache.state_dict()
        assert one.cache.meta_state() == two.cache.meta_state() and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(one.logits, two.logits), cut
    # Any other cut moves the chunk boundaries (and so when the ring is re-based): the same
    # arithmetic up to float rounding, where retrieving at every section end was 1e-2 away.
    doc = Document("doc.txt", "\n".join(CORPUS.split(". ")))
    whole = encode_document(engine, doc, "tiny", section_tokens=10_000)
    q = "Who is Ishmael?"
    want = ask(engine, whole, q, 8)
    want.text()
    for size in (13, 40):
        cut = encode_document(engine, doc, "tiny", section_tokens=size)
        assert cut.state.cache.length == whole.state.cache.length
        torch.testing.assert_close(cut.state.logits, whole.state.logits, atol=1e-5, rtol=1e-5)
        got = ask(engine, cut, q, 8)
        assert got.text() == want.text() and got.token_ids == want.token_ids
    # The old rule (the last row of every encode call retrieves) changes the state: token 95's
    # keys and values in layer 1, now in its middle store.
    old = engine.encode(ids[:96], continued=True)
    engine.encode(ids[96:], old, continued=False)
    a, b = one.cache.state_dict(), old.cache.state_dict()
    assert (a["layers.1.middle_v"].float() - b["layers.1.middle_v"].float()).abs().max() > 1e-4
    assert torch.equal(a["layers.0.middle_v"], b["layers.0.middle_v"])  # layer 0 stores its input's K/V


def test_soft_capped_scores_cap_the_retrieved_tokens_too():
    # Gemma 2 caps attention logits (cap * tanh(s / cap)): in both Λ branches and, since the
    # retrieved tokens join the same softmax, in the middle branch as well.  One layer driven
    # through the cache's step protocol against a dense reference of the whole rule.
    from lminf_cli.attention import Rope
    from lminf_cli.cache import LambdaCache

    torch.manual_seed(11)
    h, d, n, cap, scale = 2, 8, 21, 0.5, 8 ** -0.5
    rope = Rope(inv_freq=1.0 / (100.0 ** (torch.arange(0, d, 2) / d)), head_dim=d, rotary_dim=d)
    s = LambdaSettings(n_global=2, n_local=4, limit_distance=6, chunk_size=4, middle_top_k=3, middle_from_layer=0,
                       middle_distance=2, middle_block=4, middle_blocks=0, middle_dtype="float32")
    q, k, v = (3 * torch.randn(1, h if i == 0 else 1, n, d) for i in range(3))

    def engine_last_row(softcap):
        cache = LambdaCache(1, h, 1, d, rope, s, scale=scale, softcap=softcap, fused=False)
        out = None
        for a in range(0, n, 4):
            b = min(n, a + 4)
            plan = cache.plan(b - a, retrieve_last=b == n)
            out = cache.layers[0].attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], plan)
            cache.commit(plan)
        return out[0, :, -1]                                                   # [H, D]

    def rot(x, pos):
        return rope.rotate(x, *rope.cos_sin(torch.tensor([pos]), torch.device("cpu"), torch.float32))

    i = n - 1
    qi = q[0, :, i]                                                            # [H, D]
    local = [j for j in range(n) if 0 <= i - j < 4]
    glob = [j for j in range(2) if i - j >= 4]
    middle = [j for j in range(2, n) if i - j >= 4]
    s_loc = torch.stack([(rot(qi, i) * rot(k[0, 0, j], j)).sum(-1) for j in local], -1)
    s_glob = torch.stack([(rot(qi, 6) * k[0, 0, j]).sum(-1) for j in glob], -1)
    s_mid = torch.stack([(rot(qi, 2) * k[0, 0, j]).sum(-1) for j in middle], -1)
    top = s_mid.topk(3, dim=-1).indices                                        # [H, 3]

    def reference(cap_middle: bool):
        def squash(x):
            return torch.tanh(x * scale / cap) * cap

        mid = s_mid.gather(1, top) * scale
        scores = torch.cat([squash(s_loc), squash(s_glob), torch.tanh(mid / cap) * cap if cap_middle else mid], -1)
        vals = torch.stack([torch.stack([v[0, 0, j] for j in local + glob]).expand(h, -1, -1)[hh] for hh in range(h)])
        mid_vals = torch.stack([v[0, 0, torch.tensor(middle)[top[hh]]] for hh in range(h)])  # [H, 3, D]
        p = torch.softmax(scores, -1)
        return (p[:, :, None] * torch.cat([vals, mid_vals], 1)).sum(1)

    got = engine_last_row(cap)
    torch.testing.assert_close(got, reference(True), atol=1e-5, rtol=1e-5)
    assert (got - reference(False)).abs().max() > 1e-2  # what an uncapped middle branch would give


def test_middle_top_k_beyond_what_a_bounded_search_reads_is_refused(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lminf_cli.cli.app import app

    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = CliRunner().invoke(app, ["continue", str(doc), "--model", str(tiny_model_dir), "--n-local", "16",
                                 "--middle-top-k", "100", "--middle-blocks", "1", "--middle-from-layer", "0"])
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("lminf: error: --middle-top-k") and "middle_blocks" in r.stderr


@pytest.mark.parametrize("quantized", [False, True])
def test_store_top_blocks_equals_brute_force(quantized):
    torch.manual_seed(3)
    hkv, g, d, bl = 2, 3, 16, 8
    store = MiddleStore(hkv, d, block=bl, fast_device=torch.device("cpu"), store_device=torch.device("cpu"),
                        dtype=torch.int8 if quantized else torch.float32)
    k, v = torch.randn(hkv, 61, d), torch.randn(hkv, 61, d)  # the tail block is part-filled
    store.append(k, v)
    q = torch.randn(hkv * g, d)
    keys, vals = store.keys(0, 61), store._read("v", slice(0, 61))  # what the store holds (int8: dequantized)
    for n, pool in [(2, 0), (3, 0), (2, 8)]:  # exact, and a pool covering every block
        scores, values = store.top_blocks(q, n, g, max_blocks=pool)
        for head in range(hkv * g):
            kv = head // g
            s = keys[kv] @ q[head]                                                  # [61]
            padded = torch.full((64,), float("-inf"))
            padded[:61] = s
            best = padded.view(8, bl).amax(1).topk(n).indices                       # the n best blocks
            want_s = torch.cat([padded[b * bl:(b + 1) * bl] for b in best])
            want_v = torch.cat([torch.nn.functional.pad(vals[kv], (0, 0, 0, 3))[b * bl:(b + 1) * bl] for b in best])
            torch.testing.assert_close(scores[head], want_s, atol=1e-5, rtol=1e-5)
            finite = torch.isfinite(want_s)
            torch.testing.assert_close(values[head][finite], want_v[finite], atol=1e-5, rtol=1e-5)


def test_block_retrieval_through_the_cache_equals_a_dense_reference():
    # The last row also attends to every token of the 2 middle blocks holding its best match.
    from lminf_cli.attention import Rope
    from lminf_cli.cache import LambdaCache

    torch.manual_seed(12)
    h, d, n, bl, scale = 2, 8, 42, 4, 8 ** -0.5
    rope = Rope(inv_freq=1.0 / (100.0 ** (torch.arange(0, d, 2) / d)), head_dim=d, rotary_dim=d)
    s = LambdaSettings(n_global=2, n_local=4, limit_distance=6, chunk_size=4, middle_top_k=2, middle_from_layer=0,
                       middle_distance=2, middle_block=bl, middle_blocks=0, middle_dtype="float32",
                       middle_unit="block")
    q, k, v = (3 * torch.randn(1, h if i == 0 else 1, n, d) for i in range(3))
    cache = LambdaCache(1, h, 1, d, rope, s, scale=scale, fused=False)
    for a in range(0, n, 4):
        b = min(n, a + 4)
        plan = cache.plan(b - a, retrieve_last=b == n)
        out = cache.layers[0].attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], plan)
        cache.commit(plan)

    def rot(x, pos):
        return rope.rotate(x, *rope.cos_sin(torch.tensor([pos]), torch.device("cpu"), torch.float32))

    i = n - 1
    qi = q[0, :, i]
    seen = [j for j in range(n) if 0 <= i - j < 4] + [j for j in range(2) if i - j >= 4]
    middle = list(range(2, i - 3))                                         # stored in blocks of 4 from token 2
    s_seen = torch.stack([(rot(qi, i if i - j < 4 else 6) * (rot(k[0, 0, j], j) if i - j < 4 else k[0, 0, j]))
                          .sum(-1) for j in seen], -1)
    s_mid = torch.stack([(rot(qi, 2) * k[0, 0, j]).sum(-1) for j in middle], -1)  # [H, len(middle)]
    for head in range(h):
        blocks = s_mid[head].view(-1, bl).amax(1).topk(2).indices
        picked = torch.cat([torch.arange(b * bl, (b + 1) * bl) for b in blocks])
        scores = torch.cat([s_seen[head], s_mid[head][picked]]) * scale
        vals = torch.stack([v[0, 0, j] for j in seen] + [v[0, 0, middle[t]] for t in picked])
        want = torch.softmax(scores, 0) @ vals
        torch.testing.assert_close(out[0, head, -1], want, atol=1e-5, rtol=1e-5)
    assert len(middle) % bl == 0  # whole blocks: no padding in this stream
