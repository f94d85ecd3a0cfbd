"""GPT-J adapter: rotary on the first `rotary_dim` dims of each head, interleaved pairs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import Rope
from ..cache import LayerCache, StepPlan
from .base import register
from .decoder import DecoderAdapter


@register
class GPTJAdapter(DecoderAdapter):
    """Parallel block (attention and MLP read the same ln_1 output), multi-head attention.

    Only the first rotary_dim dims of q and k rotate, pairing (0, 1), (2, 3) ...;
    the global branch rotates those dims to L and leaves the rest alone.
    """

    family = "gptj"
    model_types = ("gptj",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        body = model.transformer
        self.wte, self.layers, self.ln_f, self.lm_head = body.wte, body.h, body.ln_f, model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = self.n_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        rotary_dim = cfg.rotary_dim or self.head_dim
        # HF keeps a sin/cos table rather than a rotary module; these are its frequencies.
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
        self.rope = Rope(inv_freq=inv_freq.float(), head_dim=self.head_dim, rotary_dim=rotary_dim, interleaved=True)
        self.scale = self.head_dim ** -0.5

    def embed(self, ids: Tensor) -> Tensor:
        return self.wte(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.attn
        h = layer.ln_1(x)
        q, k, v = self.project_qkv(a, h)  # [1, C, H or Hkv, D]
        return x + a.out_proj(self.attend(lc, plan, q, k, v)) + layer.mlp(h)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))
