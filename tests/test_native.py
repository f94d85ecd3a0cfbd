"""The native decode attention (native/int8_attend.cpp) against an independent float64 reference over
the de-quantized window, against the torch-ops path it replaces, inside a model's decode steps, and
its fallbacks (no compiler, $LMINF_NATIVE=off)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from families import build

from lminf_cli import native, step_script
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings

HAS_COMPILER = native._compiler() is not None
needs_native = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")


def window(hkv: int, size: int, d: int, seed: int = 0):
    """An int8 ring as Int8Ring keeps it: keys [Hkv, size, D], values transposed [Hkv, D, width], scales
    [2, Hkv, size] (bfloat16 values in float32); the padding slots of the values hold junk."""
    g = torch.Generator().manual_seed(seed)
    width = step_script.padded(size)
    k8 = torch.randint(-127, 128, (hkv, size, d), dtype=torch.int8, generator=g)
    vt8 = torch.randint(-127, 128, (hkv, d, width), dtype=torch.int8, generator=g)
    scales = (torch.rand(2, hkv, size, generator=g) * 0.03 + 0.002).bfloat16().float()
    return k8, vt8, scales


def reference(ql, qg, k8, vt8, scales, n, local_bias, k_global, v_global, global_bias, scale):
    """Softmax attention in float64 over the de-quantized slots [0, n) and the global keys."""
    hkv, rows, d = ql.shape
    k = k8[:, :n].double() * scales[0, :, :n, None].double()                            # [Hkv, n, D]
    v = (vt8[:, :, :n].double() * scales[1, :, None, :n].double()).transpose(1, 2)      # [Hkv, n, D]
    s = torch.einsum("hrd,hnd->hrn", ql.double(), k) * scale + local_bias.double().reshape(-1, rows, n)
    if global_bias is not None:
        sg = torch.einsum("hrd,hgd->hrg", qg.double(), k_global.double()) * scale
        s = torch.cat([s, sg + global_bias.double().reshape(-1, rows, sg.shape[-1])], -1)
        v = torch.cat([v, v_global.double()], 1)
    return torch.einsum("hrn,hnd->hrd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


def case(hkv=3, rows=3, d=64, size=300, n=300, g=5, glob=True, dtype=torch.bfloat16, per_head=False, seed=0):
    k8, vt8, scales = window(hkv, size, d, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ql, qg = torch.randn(2, hkv, rows, d, generator=gen) * 2
    kg, vg = torch.randn(2, hkv, g, d, generator=gen).to(dtype)
    if per_head:  # ALiBi-like: a linear bias per head over the slots, some slots masked
        slope = torch.arange(1, hkv + 1).float()[:, None, None] / 64
        local = (-slope * torch.arange(n).flip(0).float()).expand(hkv, rows, n).clone()[None]
        local[..., : n // 3] = float("-inf")
        glob_bias = torch.zeros(1, hkv, rows, g) if glob else None
    else:
        local = torch.zeros(rows, n)
        local[:, : n // 3] = float("-inf")
        glob_bias = torch.zeros(rows, g) if glob else None
    return (ql, qg, k8, vt8, scales, n, local.to(dtype), kg, vg,
            None if glob_bias is None else glob_bias.to(dtype), d ** -0.5)


CASES = {
    "decode-9-rows": dict(),
    "ring-filling": dict(size=1000, n=333),
    "one-slot": dict(n=1, size=16, g=2),
    "tails": dict(size=47, n=47, g=3),               # 2 blocks of 16 and 15 left over
    "no-global": dict(glob=False, size=530, n=530),  # over one 512-slot work item
    "float32": dict(dtype=torch.float32),
    "d128-g7": dict(hkv=2, rows=7, d=128, n=777, size=800),  # Qwen2-like: 7 rows, two blocks of 4
    "d80": dict(hkv=2, rows=4, d=80, n=100, size=100),        # a head dim read at run time
    "d16-mha": dict(hkv=4, rows=1, d=16, n=64, size=64),
    "alibi-per-head": dict(per_head=True, size=200, n=200),
    "alibi-float32": dict(per_head=True, size=64, n=64, dtype=torch.float32),
}


@needs_native
@pytest.mark.parametrize("name", list(CASES))
def test_native_attention_equals_float64_attention_over_the_dequantized_window(name):
    args = case(**CASES[name])
    out, lse = torch.ops.lminf.int8_decode_attend(*args)
    want, want_lse = reference(*args)
    assert out.dtype == torch.float32 and out.shape == want.shape
    # The query is rounded to int16 for the integer scores (head dims 64 and 128 with AVX-512): ~1e-5
    # of a score, a few 1e-4 of an output in these sharp cases; the torch path's int8 query is ~300x that.
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-3)


@needs_native
def test_a_slot_off_by_one_is_caught_by_the_reference():
    """The reference above can fail: the op with each key one slot off its value is far from it."""
    ql, qg, k8, vt8, scales, n, local, kg, vg, gb, scale = case()
    out, _ = torch.ops.lminf.int8_decode_attend(ql, qg, torch.roll(k8, 1, dims=1), vt8, scales, n, local, kg, vg,
                                                gb, scale)
    want, _ = reference(ql, qg, k8, vt8, scales, n, local, kg, vg, gb, scale)
    assert (out.double() - want).abs().max() > 1e-3


@needs_native
@pytest.mark.parametrize("name", ["decode-9-rows", "d128-g7", "alibi-per-head"])
def test_native_attention_is_at_least_as_close_as_the_torch_ops_it_replaces(name):
    """step_script.int8_attend both ways: the torch path rounds the query to int8 for its integer
    product, the native one does not; both near the reference, the native one nearer."""
    ql, qg, k8, vt8, scales, n, local, kg, vg, gb, scale = case(**CASES[name])
    ones = torch.ones(ql.shape[-1], dtype=torch.bfloat16)
    fn = step_script.scripted(step_script.int8_attend)
    want, want_lse = reference(ql, qg, k8, vt8, scales, n, local, kg, vg, gb, scale)
    errs = {}
    for use in (True, False):
        out, lse = fn(ql, qg, k8, vt8, scales, n, local, kg, vg, gb, ones, scale, None, True, use)
        errs[use] = (out.double() - want).abs().max().item(), (lse.double() - want_lse).abs().max().item()
    assert errs[False][0] < 0.05 * want.abs().max() and errs[False][1] < 0.1
    assert errs[True][0] <= errs[False][0] and errs[True][1] <= errs[False][1]


SETTINGS = LambdaSettings(n_global=3, n_local=40, limit_distance=50, chunk_size=16, kv_quantize="int8")
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)


def greedy(lm, steps: int = 40):
    engine = Engine(lm, SETTINGS)
    ids = torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    state = engine.encode(ids)
    logits, tokens = [], []
    for _ in range(steps):
        tokens.append(int(state.logits.argmax()))
        logits.append(engine.step(state, tokens[-1]).float())
    return torch.stack(logits), tokens


@needs_native
@pytest.mark.parametrize("quantize", ["int4", "none"])  # the scripted stack / the layer-by-layer path
def test_decoding_with_the_native_attention_matches_the_torch_ops(quantize, monkeypatch):
    """Steps past the window (the ring wraps and re-bases) with global tokens: the same greedy tokens
    and logits within the torch path's query rounding, with the kernel on and off."""
    lm = from_hf(build("llama", trained=40, **SIZES), None, dtype=torch.bfloat16, quantize=quantize)
    calls = []
    real = torch.ops.lminf.int8_decode_attend
    monkeypatch.setattr(torch.ops.lminf, "int8_decode_attend", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    on, tokens_on = greedy(lm)
    monkeypatch.setenv(native.ENV, "off")
    off, tokens_off = greedy(lm)
    assert tokens_on == tokens_off
    torch.testing.assert_close(on, off, rtol=0, atol=0.05 * off.abs().max().item())
    assert not torch.equal(on, off)  # the kernel did run: it does not round the query


@needs_native
def test_the_library_is_built_once_per_machine_and_reused():
    path = native.build()
    before = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == before
    assert native.available() and path.name in native.status()


def test_off_switch_runs_the_torch_ops(monkeypatch):
    monkeypatch.setenv(native.ENV, "off")
    assert not native.available()
    assert native.status() == f"torch ops (${native.ENV}=off)"
    k8, _, _ = window(1, 16, 64)
    assert not step_script.native_attend(k8, 64)


def test_a_failed_build_falls_back_with_the_compilers_error(tmp_path, monkeypatch):
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'x.cpp:1:1: error: no such intrinsic' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path / "cache"))
    native._library_path.cache_clear()
    native._load.cache_clear()
    try:
        assert native._load() == "the build failed: x.cpp:1:1: error: no such intrinsic"
        assert native.status().startswith("torch ops (the build failed")
        assert not list((tmp_path / "cache" / "native").iterdir())  # no half-written library left
    finally:  # this process keeps the library it loaded before (torch cannot unload one)
        monkeypatch.delenv("CXX")
        native._library_path.cache_clear()
        native._load.cache_clear()
    assert native.available() == HAS_COMPILER


def test_the_op_schema_exists_without_the_library():
    """TorchScript compiles code naming the op whether or not the kernel could be built."""
    assert hasattr(torch.ops.lminf, "int8_decode_attend")
    assert os.path.exists(native.SOURCE)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_native_write_stores_the_bytes_of_the_torch_ops(dtype, rows):
    """lminf::int8_write against step_script.int8_write's torch ops (quant.int8_rows): the same int8
    keys, transposed values and bfloat16 scales bit for bit, zero rows included (the scale's floor)."""
    g = torch.Generator().manual_seed(rows)
    k = (torch.randn(3, rows, 64, generator=g) * torch.rand(3, rows, 1, generator=g) * 20).to(dtype)
    v = torch.randn(3, rows, 64, generator=g).to(dtype)
    k[0, 0] = 0
    stored = []
    for use in (True, False):
        k8 = torch.zeros(1, 3, 40, 64, dtype=torch.int8)[0]
        vt8 = torch.zeros(1, 3, 64, 48, dtype=torch.int8)[0]
        scales = torch.zeros(2, 1, 3, 40)[:, 0]
        step_script.int8_write(k, v, k8, vt8, scales, 7, 7 + rows, use)
        stored.append((k8, vt8, scales))
    assert stored[1][0][:, 7:7 + rows].abs().sum() > 0  # the torch path wrote where asked
    for native_t, torch_t in zip(*stored, strict=True):
        assert torch.equal(native_t, torch_t)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_native_rms_norm_equals_torchs(dtype):
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(7, 576, generator=g) * 3).to(dtype), torch.randn(576, generator=g).to(dtype)
    ours, theirs = step_script.rms_norm(x, w, 1e-5, True), step_script.rms_norm(x, w, 1e-5, False)
    assert ours.dtype == dtype
    # The sum of squares in another order: float32 within an ulp or two, bfloat16 at most one ulp apart.
    torch.testing.assert_close(ours, theirs, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


@needs_native
def test_the_kernels_refuse_buffers_that_do_not_fit_instead_of_reading_past_them():
    ql, qg, k8, vt8, scales, n, local, kg, vg, gb, scale = case()
    with pytest.raises(RuntimeError, match="n out of range"):
        torch.ops.lminf.int8_decode_attend(ql, qg, k8[:, : n - 1], vt8, scales, n, local, kg, vg, gb, scale)
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.lminf.int8_decode_attend(ql[:2], qg[:2], k8, vt8, scales, n, local, kg, vg, gb, scale)
    k = torch.zeros(3, 2, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.lminf.int8_write(k, k, k8, vt8, scales, k8.shape[1] - 1, k8.shape[1] + 1)


PORTABLE_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[2])
torch.ops.load_library(sys.argv[1])
from test_native import CASES, case, reference
for name, kw in CASES.items():
    args = case(**kw)
    out, lse = torch.ops.lminf.int8_decode_attend(*args)
    want, want_lse = reference(*args)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-6 * want.abs().max().item())
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=2e-5)
print("ok", len(CASES))
"""


@needs_native
def test_the_avx2_build_computes_the_same_attention(tmp_path):
    """Machines of this project vary (AVX2 only, or AVX-512): the code for an AVX2 CPU (float32 scores,
    no int16 products) is built and checked here too, in a process that loads only it.  Its query is
    not rounded, so it meets the float64 reference to float32 precision."""
    lib = tmp_path / "avx2.so"
    native.compile_to(lib, "x86-64-v3")
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, str(lib), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, native.ENV: "off"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"ok {len(CASES)}"
