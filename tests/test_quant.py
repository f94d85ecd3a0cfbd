"""`--quantize int8|int4`: weight-only copies of the linear layers for decode steps, against float32
on tiny models; the packed cache (reloaded equal, dropped when the source or torch changes);
bad values and devices refused in one line."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from test_precision import BF16_REL, check_against_float32, greedy_run, prompt_ids
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from lminf_cli import kernels, models, quant
from lminf_cli.cli.app import app
from lminf_cli.errors import UsageError
from lminf_cli.models import from_hf, load_model

pytestmark = pytest.mark.skipif(not quant.kernels_available(), reason="torch without weight-only CPU kernels")
runner = CliRunner()
# int8 per output row: each weight off by at most max|row| / 254; on these random models logits
# moved by 1.0-1.6% of the largest (several prompts).  About twice the worst seen.
INT8_REL = 0.03
# int4 of Gaussian weights (not made for 4 bits): up to 8 levels of rounding per group of 32;
# logits moved by 9-16% of the largest.  Only a loose check of the arithmetic: the exactness
# test below, on weights that are 4-bit at the source (as the embedded GGUF's), is the real one.
INT4_RANDOM_REL = 0.3


def on_int4_grid(model: nn.Module) -> nn.Module:
    """Move every weight that int4 will take onto a 4-bit grid of its own groups of 32, as a Q4_1
    GGUF's are: w = (q - 8) * d + z, q in 0..15 (both ends used), d and z bfloat16 numbers."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, kind in quant.plan(model, "int4").items():
            if kind != "int4":
                continue
            w = model.get_submodule(name).weight
            n, k = w.shape
            q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
            q[..., 0], q[..., 1] = 0, 15
            d = (torch.rand(n, k // 32, 1, generator=g) * 0.05 + 0.01).to(torch.bfloat16).float()
            z = (torch.randn(n, k // 32, 1, generator=g) * 0.02).to(torch.bfloat16).float()
            w.copy_(((q - 8) * d + z).reshape(n, k))
    return model


def quantized(mode, dtype=torch.float32, grid=False):
    def make(model):
        return from_hf(on_int4_grid(model) if grid else model, None, dtype=dtype, quantize=mode)
    return make


# --------------------------------------------------------------------------- against float32

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_against_float32(dtype):
    check_against_float32(quantized("int8", dtype), INT8_REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_of_four_bit_weights_against_float32(dtype, monkeypatch):
    # Weights that are 4-bit at the source: int4 holds them exactly, so decode differs from float32
    # only by bfloat16 activations (and the int8 head).
    import test_precision

    monkeypatch.setattr(test_precision, "tiny_llama", lambda: on_int4_grid(tiny_llama()))
    check_against_float32(quantized("int4", dtype), BF16_REL, prompt_seed=34)


def test_int4_of_random_weights_stays_near_float32():
    prompt = prompt_ids(seed=13)
    ref, tokens = greedy_run(from_hf(tiny_llama(), None), prompt)
    got, _ = greedy_run(quantized("int4")(tiny_llama()), prompt, forced=tokens)
    assert (got - ref).abs().max() <= INT4_RANDOM_REL * ref.abs().max()


def test_four_bit_weights_are_held_exactly():
    lm = from_hf(on_int4_grid(tiny_llama()), None, quantize="int4")
    kinds = {name: m.kind for name, m in lm.model.named_modules() if isinstance(m, quant.QuantizedLinear)}
    assert kinds["lm_head"] == "int8" and kinds["model.layers.0.mlp.down_proj"] == "int4"
    assert set(kinds.values()) == {"int4", "int8"} and len(kinds) == 2 * 7 + 1
    for name, kind in kinds.items():
        m = lm.model.get_submodule(name)
        if kind == "int4":
            assert torch.equal(m.dequantized(), m.weight), name


def test_int8_rounding_bound():
    lin = nn.Linear(64, 48)
    q, s = quant.pack_int8(lin.weight)
    err = (q.float() * s.float()[:, None] - lin.weight).abs().max(1).values
    assert torch.all(err <= lin.weight.abs().amax(1) / 254 * 1.01 + 1e-7)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_use_the_packed_weight_and_blocks_the_dense_one(mode, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=bias))
    assert quant.install(model, mode, quant.quantize_weights(model, mode)) == 1
    lin = model[0]
    assert type(lin) is quant.QuantizedLinear and isinstance(lin, nn.Linear)
    w_q = lin.dequantized()
    with torch.inference_mode():
        for rows in range(1, kernels.FEW_ROWS_MAX + 1):
            x = torch.randn(1, rows, 64)
            ref = F.linear(x.to(torch.bfloat16).float(), w_q, lin.bias)
            y = lin(x)
            assert y.dtype == x.dtype and y.shape == (1, rows, 32)
            assert (y - ref).abs().max() <= 0.01 * ref.abs().max()
        x = torch.randn(1, kernels.FEW_ROWS_MAX + 1, 64)  # a prefill block: the dense weight, exactly
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_state_dict_and_fingerprint_are_the_dense_models():
    plain = from_hf(tiny_llama(), None)
    q = from_hf(tiny_llama(), None, quantize="int4")
    assert list(q.model.state_dict()) == list(plain.model.state_dict())
    separate = sum(t.numel() * t.element_size() for t in quant.quantized_tensors(q.model).values())
    # Fused projections (q/k/v, gate/up): the layers' packed weights are views of theirs (counted
    # once), the int4 scales a second copy.
    assert q.adapter.fused
    fused_scales = sum(f.qscales.numel() * f.qscales.element_size() for f in q.adapter.fused.values()
                       if f.kind == "int4")
    assert q.weight_bytes == plain.weight_bytes + separate + fused_scales
    assert q.decode_weight_bytes < plain.weight_bytes
    assert plain.adapter.fused == {}  # nothing quantized, nothing fused
    # A decode step reads the same bytes fused or not: the fused packs are the layers' side by side.
    fused_read = q.decode_weight_bytes
    q.adapter.fused = {}
    assert q.decode_weight_bytes == fused_read


def test_bf16_cast_leaves_the_packed_tensors_alone():
    lm = from_hf(tiny_llama(), None, dtype=torch.float32, quantize="int4")
    before = {k: v.clone() for k, v in quant.quantized_tensors(lm.model).items()}
    lm.model.to(torch.bfloat16)
    after = quant.quantized_tensors(lm.model)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


# --------------------------------------------------------------------------- the cache

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quantized"


def packings(monkeypatch):
    """Count quantize_weights calls (a cache miss packs, a hit does not)."""
    calls = []
    real = quant.quantize_weights
    monkeypatch.setattr(quant, "quantize_weights", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_weights_are_cached_and_reload_equal(cache, monkeypatch, tiny_model_dir, mode):
    calls = packings(monkeypatch)
    first = load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize=mode)
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    second = load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize=mode)
    assert len(calls) == 1  # read, not packed again
    a, b = quant.quantized_tensors(first.model), quant.quantized_tensors(second.model)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # Packed from float32 weights on the miss, from the cache on the hit: the same model either way.
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True))
    assert first.quantize == second.quantize == mode and second.dtype == torch.bfloat16
    assert second.fingerprint == load_model(str(tiny_model_dir), "cpu", "bfloat16").fingerprint
    # float32 weights with the same packed copy (the cache does not depend on --dtype).
    third = load_model(str(tiny_model_dir), "cpu", "float32", quantize=mode)
    assert len(calls) == 1 and third.dtype == torch.float32


def test_changed_source_or_torch_packs_again(cache, monkeypatch, tiny_model_dir):
    calls = packings(monkeypatch)
    load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
    weights = tiny_model_dir / "model.safetensors"
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
        load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
        assert len(calls) == 2
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: its packing layout may differ
    load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
    assert len(calls) == 3 and len(list(cache.glob("*.safetensors"))) == 3


def test_foreign_cache_file_is_replaced(cache, monkeypatch, tiny_model_dir):
    fresh = load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
    (path,) = cache.glob("*.safetensors")
    wrong = {k: v[:1] for k, v in quant.quantized_tensors(fresh.model).items()}  # wrong shapes
    quant.save_cached(path, wrong, "other", "int4")
    calls = packings(monkeypatch)
    again = load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
    assert len(calls) == 1
    a, b = quant.quantized_tensors(fresh.model), quant.quantized_tensors(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    path.write_bytes(b"not safetensors")  # unreadable: packed again too
    load_model(str(tiny_model_dir), "cpu", "bfloat16", quantize="int4")
    assert len(calls) == 2


def test_install_refuses_mismatched_tensors():
    model = nn.Sequential(nn.Linear(64, 32))
    packed = quant.quantize_weights(model, "int4")
    with pytest.raises(ValueError, match="0.qscales"):
        quant.install(model, "int4", {**packed, "0.qscales": packed["0.qscales"].float()})
    with pytest.raises(ValueError, match="expected torch.int8"):
        quant.install(model, "int8", packed)  # int4 tensors for an int8 plan
    assert type(model[0]) is nn.Linear  # nothing changed


def test_layers_the_kernels_cannot_take_stay_dense():
    model = nn.Sequential(nn.Linear(40, 32), nn.Linear(32, 24), nn.Linear(32, 32))
    assert quant.plan(model, "int4") == {"1": "int8", "2": "int4"}  # 40 % 32; 24 % 16
    assert quant.plan(model, "none") == {}


# --------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("value", ["int3", "fp8", "4"])
def test_bad_mode_is_a_usage_error(value):
    with pytest.raises(UsageError, match="--quantize"):
        quant.check_mode(value)
    assert quant.check_mode("INT4") == "int4" and quant.check_mode(None) == "none"


def test_quantization_needs_the_cpu(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(models, "pick_device", lambda device: torch.device("cuda"))
    with pytest.raises(UsageError, match="CPU only") as err:
        load_model(str(tiny_model_dir), "cuda", quantize="int8")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="CPU only"):
        load_model(str(tiny_model_dir), "cpu", quantize="int4", device_map="auto")


@pytest.mark.parametrize("args", [["--quantize", "int3"], ["--quantize", "int4", "--device", "cuda"]])
def test_cli_bad_quantization_one_line_exit_2(tmp_path, tiny_model_dir, args):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello there, general Kenobi")
    r = runner.invoke(app, ["continue", str(doc), "--model", str(tiny_model_dir), "-n", "2", *args])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lminf: error: ") and "--" in lines[0], r.stderr


def test_cli_continue_quantized(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LMINF_CACHE", str(tmp_path / "cache"))
    doc = tmp_path / "doc.txt"
    doc.write_text("It was the best of times, it was the worst of times. " * 5)
    args = ["continue", str(doc), "--model", str(tiny_model_dir), "-n", "6", "--n-local", "32", "--n-global", "4"]
    dense = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    q = runner.invoke(app, [*args, "--dtype", "bfloat16", "--quantize", "int8"])
    assert dense.exit_code == 0 and q.exit_code == 0, q.stderr
    assert q.stdout.strip() and q.stderr == ""


# --------------------------------------------------------------------------- fused projections

def quantized_layers(mode, sizes=(64, 32, 32), bias=False):
    torch.manual_seed(1)
    model = nn.ModuleDict({f"p{i}": nn.Linear(64, n, bias=bias) for i, n in enumerate(sizes)})
    with torch.no_grad():
        for m in model.values():
            if bias:
                m.bias.normal_()
    quant.install(model, mode, quant.quantize_weights(model, mode))
    return [model[f"p{i}"] for i in range(len(sizes))]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_fused_projection_is_its_layers_side_by_side(mode, bias):
    layers = quantized_layers(mode, sizes=(64, 64, 32), bias=bias)
    x = torch.randn(1, 2, 64)
    with torch.inference_mode():
        before = [m(x) for m in layers]
        weights = [m.qweight.clone() for m in layers]
        fused = quant.fuse(layers)
        assert fused is not None and fused.sizes == [64, 64, 32]
        # The same kernel over the same packed rows: the same numbers.
        assert torch.equal(fused(x), torch.cat(before, dim=-1))
        assert torch.equal(fused(x.to(torch.bfloat16)).float(), torch.cat([m(x.to(torch.bfloat16)).float()
                                                                          for m in layers], dim=-1))
        # Each layer keeps working, its packed weight now a view of the fused one's rows (one copy).
        assert all(torch.equal(m(x), b) for m, b in zip(layers, before, strict=True))
        base = fused.qweight.untyped_storage().data_ptr()
        assert all(m.qweight.untyped_storage().data_ptr() == base for m in layers)
        assert all(torch.equal(m.qweight, w) for m, w in zip(layers, weights, strict=True))
        # A prefill block is not the fused kernel's: the callers run the layers (dense weights).
        assert fused(torch.randn(1, kernels.FEW_ROWS_MAX + 1, 64)) is None


def test_layers_of_other_kinds_or_inputs_are_not_fused():
    int8, int4 = quantized_layers("int8", (32, 32)), quantized_layers("int4", (64, 32))
    assert quant.fuse([int8[0], int4[0]]) is None
    assert quant.fuse([int8[0]]) is None
    assert quant.fuse([int8[0], nn.Linear(64, 32)]) is None


@pytest.mark.parametrize("sizes", [(32, 32), (96, 32), (32, 64)])
def test_int4_packs_that_do_not_concatenate_are_left_apart(sizes):
    # Outputs are packed in blocks of 64: a first layer of 32 or 96 outputs spoils the concatenation.
    layers = quantized_layers("int4", sizes)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        unchecked = quant.FusedProjection(layers)(x)
        right = torch.cat([m(x) for m in layers], dim=-1)
    assert (unchecked - right).abs().max() > 0.1 * right.abs().max()  # what the check is for
    weights = [m.qweight for m in layers]
    assert quant.fuse(layers) is None
    assert all(m.qweight is w for m, w in zip(layers, weights, strict=True))  # untouched


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "gptj"])
def test_decode_through_fused_projections_equals_decode_through_the_layers(name):
    from families import build

    lm = from_hf(build(name), None, quantize="int8")
    assert lm.adapter.fused, "no projections were fused"
    prompt = prompt_ids(seed=3)
    fused, tokens = greedy_run(lm, prompt)
    lm.adapter.fused = {}
    separate, _ = greedy_run(lm, prompt, forced=tokens)
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)
