"""The few-row CPU projection kernel: same products as F.linear, used only inside the
adapters' forwards, and the fused CPU attention fed only unit-stride heads."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, tiny_llama
from torch import nn
from torch.nn import functional as F

from lminf_cli import kernels
from lminf_cli.attention import attention_with_lse
from lminf_cli.generate import Engine
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("splits", [2, 8, 16])
def test_few_row_linear_equals_f_linear(rows, bias, splits):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(1, rows, 40, generator=g)
    y = kernels.few_row_linear(x, w, b, splits)
    assert y.shape == (1, rows, 96) and y.is_contiguous()
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5)


def test_splits_are_powers_of_two_that_divide_the_rows():
    assert kernels.splits_for(576, 2) == 8
    assert kernels.splits_for(49152, 2) == 8
    assert kernels.splits_for(49152, 16) == kernels.MAX_SPLITS
    assert kernels.splits_for(192, 1) == 4
    assert kernels.splits_for(6, 2) == 2
    assert kernels.splits_for(97, 2) == 1  # odd: no cut, plain kernel


class Scaled(nn.Linear):
    """A Linear subclass with a forward of its own, which install must leave alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_install_swaps_plain_linears_only():
    m = nn.Sequential(nn.Linear(8, 16), Scaled(16, 8), nn.ReLU())
    keys = list(m.state_dict())
    assert kernels.install(m) == 1
    assert type(m[0]) is kernels.FewRowLinear and type(m[1]) is Scaled
    assert list(m.state_dict()) == keys
    assert kernels.install(m) == 0  # idempotent


def test_batched_path_only_inside_the_adapters_forward(monkeypatch):
    calls = []
    real = kernels.few_row_linear
    monkeypatch.setattr(kernels, "few_row_linear", lambda *a: calls.append(1) or real(*a))
    lin = nn.Linear(32, 64).to(DEVICE)
    kernels.install(lin)
    x = torch.randn(1, 1, 32, device=DEVICE)
    # Outside the context (the HF model's own forward: bench and eval baselines), exactly F.linear.
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and not calls
    with torch.inference_mode(), kernels.few_row_projections():
        lin(x)
        lin(torch.randn(1, kernels.FEW_ROWS_MAX + 1, 32, device=DEVICE))  # a prefill block: plain GEMM
        with pytest.raises(RuntimeError):  # a wrong width fails as F.linear does, never reshaped into rows
            lin(torch.randn(1, 1, 64, device=DEVICE))
    assert len(calls) == (1 if DEVICE.type == "cpu" else 0)


def test_unmodified_forward_is_untouched_by_install():
    model = tiny_llama(4, 2)
    ids = torch.randint(0, 97, (1, 9), device=DEVICE)
    with torch.no_grad():
        before = model(ids).logits
        from_hf(model, None)  # the adapter installs the kernel
        after = model(ids).logits
    assert type(model.lm_head) is kernels.FewRowLinear
    assert torch.equal(before, after)


def test_decode_steps_equal_with_and_without_the_kernel(monkeypatch):
    lm = from_hf(tiny_llama(4, 2, trained=16), None)
    ids = torch.randint(0, 97, (1, 40), device=DEVICE)

    def decode(max_rows):
        monkeypatch.setattr(kernels, "FEW_ROWS_MAX", max_rows)
        engine = Engine(lm, LambdaSettings(3, 8, 12).replace(chunk_size=5))
        state = engine.encode(ids[0, :30])
        return torch.stack([engine.step(state, int(t)) for t in ids[0, 30:]])  # [10, V]

    assert torch.allclose(decode(4), decode(0), atol=1e-4)


def test_fused_cpu_attention_reads_strided_heads_correctly():
    # A head dim with stride != 1 (a transposed projection output) made the private
    # CPU flash kernel return garbage; attention_with_lse hands it unit-stride rows.
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(2 * 16, 8, generator=g)                     # [H*D, C] as a GEMM might leave it
    q = storage.T.reshape(1, 8, 2, 16).transpose(1, 2)                # [1, 2, 8, 16], stride(-1) == 8
    k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    assert q.stride(-1) != 1
    out, lse = attention_with_lse(q, k, v, None, 0.25, fused=True)
    ref, ref_lse = attention_with_lse(q.contiguous(), k, v, None, 0.25, fused=False)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
