"""The scripted decode step (step_script.llama_layers): where it applies, the logits of the
layer-by-layer path bit for bit (that path is the one the dense-reference tests check); where the
block or the step is another, the layer-by-layer path runs."""

from __future__ import annotations

import pytest
import torch
from families import build

from lminf_cli import native, step_script
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings

# A window of 8, chunks of 5: the ring (13 slots) wraps, re-bases, and is read under a mask;
# 3 global tokens, seen by the later steps only.
SETTINGS = LambdaSettings(n_global=3, n_local=8, limit_distance=12, chunk_size=5, kv_quantize="int8")
# Sizes at which every projection takes the int4 kernel and fuses (q/k/v 128 + 64 + 64: at 64 + 32 + 32
# the int4 packs do not concatenate and stay apart), with two query heads per KV head.
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)


def prompt(n: int = 11, seed: int = 5) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def spied(lm, monkeypatch) -> list[bool]:
    """Record, per decode step, whether the layer stack ran as one scripted call."""
    calls: list[bool] = []
    real = lm.adapter.decode_layers

    def spy(x, cache, plan):
        out = real(x, cache, plan)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(lm.adapter, "decode_layers", spy)
    return calls


def decode(lm, settings=SETTINGS, steps: int = 24, tokens: list[int] | None = None):
    """Logits [steps + 1, V] of the prompt's last row and of `steps` steps, and the tokens fed (greedy
    ones, or `tokens`)."""
    engine = Engine(lm, settings)
    state = engine.encode(prompt())
    out, fed = [state.logits.float()], []
    for i in range(steps):
        fed.append(int(state.logits.argmax()) if tokens is None else tokens[i])
        out.append(engine.step(state, fed[-1]).float())
    return torch.stack(out), fed


@pytest.mark.parametrize("kernels", ["native", "torch"])  # native.llama_layers, or TorchScript's over torch ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_scripted_steps_equal_the_layer_by_layer_path(name, mode, dtype, kernels, monkeypatch):
    if kernels == "torch":
        monkeypatch.setenv(native.ENV, "off")
    elif native._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    over = dict(SIZES, use_sliding_window=False) if name == "qwen2" else SIZES
    lm = from_hf(build(name, trained=8, **over), None, dtype=dtype, quantize=mode)
    calls = spied(lm, monkeypatch)
    scripted, tokens = decode(lm)
    # Every step past the global tokens (and the prompt's last one-token block: 11 = 5 + 5 + 1).
    assert len(calls) == 25 and all(calls), calls
    monkeypatch.setenv(step_script.ENV, "off")
    layered, _ = decode(lm, tokens=tokens)
    assert len(calls) == 50 and not any(calls[25:])
    assert torch.equal(scripted, layered)


def test_a_planted_error_in_the_scripted_step_shows(monkeypatch):
    # The comparison above can fail: the same step writing its key one slot off changes the logits.
    # (TorchScript's stack: native.llama_layers, which replaces it where built, has its own below.)
    monkeypatch.setenv(native.ENV, "off")
    lm = from_hf(build("llama", trained=8, **SIZES), None, quantize="int8")
    layered, tokens = decode(lm, steps=12)
    real = step_script.int8_write

    def off_by_one(k, v, k8, vt8, scales, a: int, b: int, use_native: bool = False):
        if b - a == 1:  # a decode step's token (prefill blocks as they were)
            a = (a + 1) % k8.shape[1]
            b = a + 1
        real(k, v, k8, vt8, scales, a, b, use_native)

    monkeypatch.setattr(step_script, "int8_write", off_by_one)
    monkeypatch.setattr(step_script, "scripted", lambda fn: fn)  # Python functions, so the patch is seen
    planted, _ = decode(lm, steps=12, tokens=tokens)
    assert not torch.equal(planted, layered)


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler on this machine")
def test_a_planted_error_in_the_native_layer_loop_shows(monkeypatch):
    lm = from_hf(build("llama", trained=8, **SIZES), None, quantize="int8")
    calls = spied(lm, monkeypatch)
    clean, tokens = decode(lm, steps=12)
    assert sum(calls) >= 8 and native.available()
    real = torch.ops.lminf.llama_layers

    def off_by_one(x, weights, biases, kinds, eps, rings, step_mat, slot, *rest):
        return real(x, weights, biases, kinds, eps, rings, step_mat, (slot + 1) % rings[0].shape[1], *rest)

    monkeypatch.setattr(torch.ops.lminf, "llama_layers", off_by_one, raising=False)
    planted, _ = decode(lm, steps=12, tokens=tokens)
    assert not torch.equal(planted, clean)


def test_this_torch_compiles_every_scripted_function():
    # A function TorchScript cannot compile falls back to Python silently (same logits, slower):
    # with the pinned torch all of them must compile, the helpers they call (quant's) included.
    for fn in (step_script.int8_write, step_script.int8_attend, step_script.llama_layers):
        assert isinstance(step_script._compiled(fn), torch.jit.ScriptFunction), fn.__name__


def test_without_torchscript_the_same_functions_run_from_python(monkeypatch):
    lm = from_hf(build("llama", trained=8, **SIZES), None, quantize="int4")
    want, tokens = decode(lm, steps=12)

    def unavailable(fn):
        raise RuntimeError("no TorchScript here")

    step_script._compiled.cache_clear()
    monkeypatch.setattr(torch.jit, "script", unavailable)
    try:
        assert step_script.scripted(step_script.llama_layers) is step_script.llama_layers
        calls = spied(lm, monkeypatch)
        got, _ = decode(lm, steps=12, tokens=tokens)
        assert all(calls)
        assert torch.equal(got, want)
    finally:
        step_script._compiled.cache_clear()  # the next caller compiles again


@pytest.mark.parametrize("case", ["not quantized", "fusions dropped", "float window", "retrieval",
                                  "q/k norm (qwen3)", "sliding window (mistral)"])
def test_other_blocks_and_steps_run_layer_by_layer(case, monkeypatch):
    settings, quantize, name, over = SETTINGS, "int8", "llama", SIZES
    if case == "not quantized":
        quantize = "none"
    elif case == "float window":
        settings = SETTINGS.replace(kv_quantize="none")
    elif case == "retrieval":
        settings = SETTINGS.replace(middle_top_k=2, middle_from_layer=0, middle_block=4)
    elif case == "q/k norm (qwen3)":
        name = "qwen3"
    else:
        name, over = "mistral", dict(SIZES, sliding_window=6)
    lm = from_hf(build(name, trained=8, **over), None, quantize=quantize)
    if case == "fusions dropped":
        decode(lm, steps=2)  # found scripted once: dropping the fusions must be seen
        lm.adapter.fused = {}
    calls = spied(lm, monkeypatch)
    logits, _ = decode(lm, settings, steps=8)
    assert len(calls) == 9 and not any(calls)
    assert torch.isfinite(logits).all()
