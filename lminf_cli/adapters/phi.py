"""Phi (phi-1, phi-1.5, phi-2) adapter: partial rotary, parallel block, biased projections."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from .base import register
from .decoder import DecoderAdapter


@register
class PhiAdapter(DecoderAdapter):
    """One LayerNorm feeds attention and MLP in parallel; optional per-head q/k LayerNorm."""

    family = "phi"
    model_types = ("phi",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.read_hf_body(model, model.model.final_layernorm)
        self.split_rotary_scaling()

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = self.project_qkv(a, h)  # [1, C, H or Hkv, D]
        if a.qk_layernorm:
            q, k = a.q_layernorm(q), a.k_layernorm(k)
        return x + a.dense(self.attend(lc, plan, q, k, v)) + layer.mlp(h)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
