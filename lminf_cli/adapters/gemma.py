"""Gemma and Gemma 2 adapters."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from .base import config_layer_windows, register
from .decoder import DecoderAdapter
from .llama import LlamaAdapter


@register
class GemmaAdapter(LlamaAdapter):
    """Gemma 1 is a Llama block; its differences live inside the HF modules.

    The embedding module multiplies by sqrt(hidden) itself, the RMSNorms scale by
    (1 + w), the MLP is GeGLU, and the softmax temperature is read off the
    attention module.
    """

    family = "gemma"
    model_types = ("gemma",)


@register
class Gemma2Adapter(DecoderAdapter):
    """Gemma 2: sandwich norms, logit soft-capping, alternating sliding-window layers.

    Attention logits are soft-capped (softcap * tanh(s / softcap)) in both
    branches, which sends attention down the exact eager path.  Sliding layers
    keep their own window; full-attention layers get the Λ rule.  The softmax
    temperature is query_pre_attn_scalar ** -0.5, read off the module.
    """

    family = "gemma2"
    model_types = ("gemma2",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        self.read_hf_body(model, model.model.norm)
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

    def layer_windows(self) -> list[int | None]:
        return config_layer_windows(self.config, self.n_layers)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)  # scales by sqrt(hidden) itself

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = self.project_qkv(a, h)  # [1, C, H or Hkv, D]
        x = x + layer.post_attention_layernorm(a.o_proj(self.attend(lc, plan, q, k, v)))
        return x + layer.post_feedforward_layernorm(self.mlp(layer.mlp, layer.pre_feedforward_layernorm(x)))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
