"""Llama-family adapter: Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM (RoPE, GQA)."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from .base import config_layer_windows, execution_device, register, rope_from_hf
from .decoder import DecoderAdapter


@register
class LlamaAdapter(DecoderAdapter):
    """Pre-norm decoder, rotate-half RoPE on the whole head, grouped-query attention.

    Qwen3's per-head q/k RMSNorm and Qwen2's projection biases are handled by the
    HF modules themselves; sliding-window layers (Mistral, Qwen2/3 with
    use_sliding_window) keep their own window.
    """

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        body = model.model
        self.embed_tokens, self.layers, self.norm, self.lm_head = body.embed_tokens, body.layers, body.norm, \
            model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.rope = rope_from_hf(body.rotary_emb, self.head_dim)
        self.scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5))

    def layer_windows(self) -> list[int | None]:
        return config_layer_windows(self.config, self.n_layers)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        attn = layer.self_attn
        q, k, v = self.project_qkv(attn, self.apply_norm(layer.input_layernorm, x))  # [1, C, H or Hkv, D]
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        x = x + attn.o_proj(self.attend(lc, plan, q, k, v))
        return x + self.mlp(layer.mlp, self.apply_norm(layer.post_attention_layernorm, x))

    def head(self, x: Tensor) -> Tensor:
        # Each .to is a no-op unless a device map put the norm and the head elsewhere.
        return self.lm_head(self.norm(x.to(execution_device(self.norm))).to(execution_device(self.lm_head)))
