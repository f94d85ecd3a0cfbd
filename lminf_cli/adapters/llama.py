"""Llama-family adapter: Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM (RoPE, GQA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import LambdaCache
from .base import Adapter, Rows, config_layer_windows, no_grad_forward, register, rope_from_hf


@register
class LlamaAdapter(Adapter):
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
        self.embed, self.layers, self.norm, self.lm_head = body.embed_tokens, body.layers, body.norm, model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.rope = rope_from_hf(body.rotary_emb, self.head_dim)
        self.scale = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5))

    def layer_windows(self) -> list[int | None]:
        return config_layer_windows(self.config, self.n_layers)

    @no_grad_forward
    def forward(self, ids: Tensor, cache: LambdaCache, rows: Rows = None) -> Tensor | None:
        c = ids.shape[1]
        plan = cache.plan(c)
        x = self.embed(ids)  # [1, C, hidden]
        for layer, lc in zip(self.layers, cache.layers, strict=True):
            attn = layer.self_attn
            x = x.to(lc.k_ring.device)  # no-op unless a device map split the model
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, c, self.n_heads, self.head_dim)      # [1, C, H, D]
            k = attn.k_proj(h).view(1, c, self.n_kv_heads, self.head_dim)   # [1, C, Hkv, D]
            v = attn.v_proj(h).view(1, c, self.n_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            o = lc.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan)  # [1, H, C, D]
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, c, self.n_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.commit(plan)
        if rows is None:
            return None
        x = x[:, rows].to(self.norm.weight.device)
        return self.lm_head(self.norm(x).to(self.lm_head.weight.device))  # [1, rows, V]

    def layer_devices(self) -> list[torch.device]:
        return [layer.input_layernorm.weight.device for layer in self.layers]
