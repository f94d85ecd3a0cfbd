"""Phi-3 / Phi-4-mini adapter: fused qkv, RMSNorm, LongRoPE, optional sliding window."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from .base import config_layer_windows, register
from .decoder import DecoderAdapter, heads_view


@register
class Phi3Adapter(DecoderAdapter):
    """Llama-like block with one fused [q; k; v] projection.

    LongRoPE switches HF to its "long" frequencies as soon as an input exceeds
    the original pre-training length; lminf keeps the "short" frequencies and
    takes that original length as L, so the window is always within what the
    model was pre-trained on and inside it the output equals HF's.
    """

    family = "phi3"
    model_types = ("phi3",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.read_hf_body(model, model.model.norm)
        rope_params = getattr(cfg, "rope_parameters", None) or {}
        if rope_params.get("rope_type") == "longrope":
            self.trained_length = int(rope_params.get("original_max_position_embeddings") or self.trained_length)
        self.split_rotary_scaling()

    def layer_windows(self) -> list[int | None]:
        return config_layer_windows(self.config, self.n_layers)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.self_attn
        qkv = a.qkv_proj(layer.input_layernorm(x))
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q = heads_view(qkv[..., :nq], self.n_heads, self.head_dim)              # [1, C, H, D]
        k = heads_view(qkv[..., nq:nq + nkv], self.n_kv_heads, self.head_dim)   # [1, C, Hkv, D]
        v = heads_view(qkv[..., nq + nkv:], self.n_kv_heads, self.head_dim)
        x = x + a.o_proj(self.attend(lc, plan, q, k, v))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
