"""Precision on the CPU: `--dtype auto` and its feature probe, bfloat16 against float32 on tiny
models, the rotary frequencies of a model cast to bfloat16, and the few-row kernel's
per-machine verdict."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from families import ROPE, build
from torch.nn import functional as F

from lminf_cli import kernels
from lminf_cli.adapters import base
from lminf_cli.attention import lambda_attention
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf, load_model, pick_dtype
from lminf_cli.settings import LambdaSettings

CPU = torch.device("cpu")
REAL_PROBE = kernels.cpu_bf16_feature  # taken at import, before conftest's session fixture replaces it
# bfloat16 keeps 8 bits of mantissa: logits of these tiny models move by about 1% of the largest
# (measured 0.8-1.4% over several prompts).  About twice the worst seen.
BF16_REL = 0.03


def settings():
    return LambdaSettings(3, 8, 12).replace(chunk_size=5)


def greedy_run(lm, prompt, steps=8, forced=None):
    """Logits of the prompt's last row and of each step [steps + 1, V], and the tokens fed: the
    greedy ones, or `forced` (teacher forcing, so two precisions see the same inputs)."""
    engine = Engine(lm, settings())
    state = engine.encode(prompt)
    logits, tokens = [state.logits.float()], []
    for i in range(steps):
        tokens.append(int(torch.argmax(state.logits)) if forced is None else forced[i])
        logits.append(engine.step(state, tokens[-1]).float())
    return torch.stack(logits), tokens


def top2_margin(logits):
    """Smallest gap between the best and second-best logit over the rows of [R, V]."""
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def check_against_float32(make, rel, prompt_seed=13):
    """`make(model)` -> LoadedModel in some precision, against float32 on the same tiny model:
    teacher-forced logits within `rel` of the largest logit, and free-running greedy tokens equal
    (on a prompt where float32's top-2 margins exceed the error, so a flip would be a bug)."""
    prompt = prompt_ids(seed=prompt_seed)
    ref, ref_tokens = greedy_run(from_hf(tiny_llama(), None), prompt)
    lm = make(tiny_llama())
    got, _ = greedy_run(lm, prompt, forced=ref_tokens)
    err = float((got - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), (err, float(ref.abs().max()))
    assert top2_margin(ref) > 2 * err, "this prompt has near-ties: pick another seed"
    _, tokens = greedy_run(lm, prompt)
    assert tokens == ref_tokens
    return err


def prompt_ids(n=30, seed=3):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- rotary frequencies

@pytest.mark.parametrize("name", ROPE)
def test_bf16_model_keeps_float32_rotary_frequencies(name):
    # model.to(bfloat16) casts HF's inv_freq buffers too; the adapter must rotate with the
    # frequencies the model was built with, as a float32 load does (bit for bit).
    f32 = from_hf(build(name), None).adapter.rope.inv_freq
    bf16 = from_hf(build(name), None, dtype=torch.bfloat16).adapter.rope.inv_freq
    assert f32.dtype == bf16.dtype == torch.float32
    assert torch.equal(bf16, f32)


def test_the_cast_buffer_alone_would_rotate_wrongly():
    # What the fix prevents: the buffer as cast differs from the float32 frequencies, enough
    # to turn a key at distance 5,000 by more than 0.05 rad (attention at long range drifts).
    model = tiny_llama().to(torch.bfloat16)
    cast = model.model.rotary_emb.original_inv_freq
    assert cast.dtype == torch.bfloat16
    f32 = from_hf(tiny_llama(), None).adapter.rope.inv_freq
    assert (5000 * (cast.float() - f32)).abs().max() > 0.05
    assert torch.equal(base._float32_inv_freq(model.model.rotary_emb, cast), f32)


def test_rebuilt_frequencies_that_do_not_match_the_buffer_are_not_trusted():
    model = tiny_llama().to(torch.bfloat16)
    rotary = model.model.rotary_emb
    other = rotary.original_inv_freq * 2  # e.g. frequencies changed after construction
    assert torch.equal(base._float32_inv_freq(rotary, other), other)


# --------------------------------------------------------------------------- --dtype auto

@pytest.mark.parametrize("feature,expected", [(None, torch.float32), ("amx_bf16", torch.bfloat16),
                                              ("avx512_bf16", torch.bfloat16)])
def test_auto_dtype_on_the_cpu_follows_the_probe(monkeypatch, feature, expected):
    monkeypatch.setattr(kernels, "cpu_bf16_feature", lambda: feature)
    assert pick_dtype("auto", CPU) == pick_dtype(None, CPU) == expected
    # An explicit --dtype always wins, and CUDA keeps bfloat16.
    assert pick_dtype("float32", CPU) == torch.float32
    assert pick_dtype("bf16", CPU) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_probe_reads_bf16_features_from_flags():
    assert kernels.bf16_feature({"avx2", "fma3", "avx512_f"}) is None  # AVX2 / plain AVX-512: float32
    assert kernels.bf16_feature({"avx2", "avx512_bf16"}) == "avx512_bf16"
    assert kernels.bf16_feature({"avx512_bf16", "amx_bf16", "amx_tile"}) == "amx_bf16"


def test_probe_falls_back_to_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert kernels.bf16_feature(kernels._cpuinfo_flags(info)) == "avx512_bf16"
    assert kernels._cpuinfo_flags(tmp_path / "missing") == set()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert kernels._torch_cpu_flags() == set()


def test_probe_agrees_with_torch_on_this_machine():
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:
        pytest.skip("torch without get_capabilities")
    real = REAL_PROBE()
    has = caps().get("amx_bf16") is True or caps().get("avx512_bf16") is True
    assert (real is not None) == (has and torch.backends.mkldnn.is_available())


def test_auto_loads_bf16_weights_cache_and_store_where_the_cpu_has_bf16(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(kernels, "cpu_bf16_feature", lambda: "amx_bf16")
    lm = load_model(str(tiny_model_dir), "cpu", "auto")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    engine = Engine(lm, LambdaSettings(4, 16, 16).replace(chunk_size=8, middle_top_k=2, middle_from_layer=0))
    state = engine.encode(list(range(3, 60)))
    layer = state.cache.layers[0]
    assert layer.k_ring.dtype == layer.v_ring.dtype == layer.k_global.dtype == torch.bfloat16
    assert layer.middle is not None and layer.middle.dtype == layer.middle.k.dtype == torch.bfloat16  # auto
    monkeypatch.setattr(kernels, "cpu_bf16_feature", lambda: None)
    assert load_model(str(tiny_model_dir), "cpu", "auto").dtype == torch.float32


# --------------------------------------------------------------------------- bfloat16 against float32

def test_bf16_engine_against_float32():
    check_against_float32(lambda m: from_hf(m, None, dtype=torch.bfloat16), BF16_REL)


def test_bf16_attention_merges_in_float32():
    # Both branches in bfloat16; the log-sum-exp comes back in float32 and the merged output
    # matches the float32 computation within bfloat16 rounding of the inputs.
    g = torch.Generator().manual_seed(0)
    q, qg = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 4, 3, 16, generator=g)
    k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    kg, vg = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 4, 16, generator=g)
    lb, gb = torch.zeros(6, 20), torch.zeros(6, 4)
    lb[:, 15:] = float("-inf")
    ref, ref_lse = lambda_attention(q, qg, k, v, lb, kg, vg, gb, 0.25, return_lse=True)
    bf = [t.to(torch.bfloat16) for t in (q, qg, k, v, lb, kg, vg, gb)]
    out, lse = lambda_attention(*bf, 0.25, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.05 and (lse - ref_lse).abs().max() < 0.05


# --------------------------------------------------------------------------- few-row verdict

@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Auto mode with the cache in tmp_path and the measurement replaced: returns the list of
    (dtype, threads) measured and a setter for the ratio it reports."""
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path))
    monkeypatch.setenv(kernels.FEW_ROW_ENV, "auto")
    monkeypatch.setattr(kernels, "_VERDICTS", {})
    calls, ratio = [], {"value": 2.0}

    def fake(dtype, threads, *a, **k):
        calls.append((dtype, threads))
        return ratio["value"]

    monkeypatch.setattr(kernels, "measure_few_row", fake)
    return calls, ratio


def test_verdict_is_measured_once_per_machine_and_kept(measured):
    calls, ratio = measured
    assert kernels.few_row_enabled(torch.float32, 2) is False   # 2x slower: off
    assert kernels.few_row_enabled(torch.float32, 2) is False and len(calls) == 1
    kept = json.loads(kernels.verdict_path().read_text())
    key = kernels.verdict_key(torch.float32, 2)
    assert kept[key] == {"enabled": False, "ratio": 2.0}
    assert kernels.cpu_name() in key and torch.__version__ in key and "2 threads" in key
    # A new process reads the file instead of measuring.
    kernels._VERDICTS.clear()
    assert kernels.few_row_enabled(torch.float32, 2) is False and len(calls) == 1
    # Other thread counts and dtypes have verdicts of their own; deleting the file measures again.
    ratio["value"] = 0.5
    assert kernels.few_row_enabled(torch.bfloat16, 2) is True and len(calls) == 2
    kernels.verdict_path().unlink()
    kernels._VERDICTS.clear()
    assert kernels.few_row_enabled(torch.float32, 2) is True and len(calls) == 3


def test_verdict_needs_a_clear_win(measured):
    _, ratio = measured
    ratio["value"] = 0.95  # within timing noise of F.linear: not worth the risk
    assert kernels.few_row_enabled(torch.float32, 1) is False


def test_slower_kernel_is_never_used(measured, monkeypatch):
    calls = []
    real = kernels.few_row_linear
    monkeypatch.setattr(kernels, "few_row_linear", lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(32, 64)
    kernels.install(lin)
    x = torch.randn(1, 1, 32)
    with torch.inference_mode(), kernels.few_row_projections():
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert not calls
    monkeypatch.setenv(kernels.FEW_ROW_ENV, "on")  # forced on, whatever was measured
    with torch.inference_mode(), kernels.few_row_projections():
        lin(x)
    assert calls


def test_unwritable_cache_still_decides(measured, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LMINF_CACHE", str(blocker / "sub"))  # a directory under a file: cannot exist
    assert kernels.few_row_enabled(torch.float32, 3) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measurement_runs_both_forms(dtype):
    ratio = kernels.measure_few_row(dtype, 1, shapes=((256, 64), (64, 64)), repeats=2)
    assert 0 < ratio < float("inf")


def test_bf16_few_row_linear_equals_f_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 3, 64, generator=g).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    y = kernels.few_row_linear(x, w, None, 8)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.01 * ref.abs().max()
