"""Falcon adapter (rotary variants: Falcon-7B/40B/180B and new_decoder_architecture)."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from ..errors import ModelError
from .base import register, rope_from_hf, supported_model_types
from .decoder import DecoderAdapter


@register
class FalconAdapter(DecoderAdapter):
    """Fused qkv in three layouts, parallel or sequential attention + MLP.

    * new_decoder_architecture (40B, 180B): per KV group [g queries, key, value],
      two LayerNorms (ln_attn, ln_mlp) or one;
    * multi_query (7B): [H queries, one key, one value];
    * otherwise: per head (q, k, v).
    The ALiBi variant (Falcon-RW) is refused: HF builds its bias from absolute
    positions rounded to bfloat16, which no relative-distance cache can
    reproduce exactly.
    """

    family = "falcon"
    model_types = ("falcon",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if getattr(cfg, "alibi", False):
            raise ModelError("Falcon with ALiBi (Falcon-RW) is not supported: HF builds its bias from absolute "
                             "positions rounded to bfloat16, which a constant-size cache cannot reproduce; "
                             "supported: " + ", ".join(supported_model_types()))
        body = model.transformer
        self.wte, self.layers, self.ln_f, self.lm_head = body.word_embeddings, body.h, body.ln_f, model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.n_heads
        self.new_arch = bool(cfg.new_decoder_architecture)
        if self.new_arch:
            self.n_kv_heads = cfg.num_kv_heads
        elif cfg.multi_query:
            self.n_kv_heads = 1
        else:
            self.n_kv_heads = self.n_heads
        self.parallel = bool(cfg.parallel_attn)
        self.rope = rope_from_hf(body.rotary_emb, self.head_dim)
        self.scale = self.head_dim ** -0.5

    def _qkv(self, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused projection [1, C, *] -> q [1, C, H, D], k/v [1, C, Hkv, D]."""
        c, h, hkv, d = fused.shape[1], self.n_heads, self.n_kv_heads, self.head_dim
        if self.new_arch:
            g = h // hkv
            qkv = fused.view(1, c, hkv, g + 2, d)  # per KV group: g queries, key, value
            return qkv[:, :, :, :g].reshape(1, c, h, d), qkv[:, :, :, g], qkv[:, :, :, g + 1]
        if hkv == 1:
            qkv = fused.view(1, c, h + 2, d)  # all queries, then one key and one value
            return qkv[:, :, :h], qkv[:, :, h:h + 1], qkv[:, :, h + 1:]
        qkv = fused.view(1, c, h, 3, d)  # per head (q, k, v)
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]

    def embed(self, ids: Tensor) -> Tensor:
        return self.wte(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.self_attention
        two_norms = hasattr(layer, "ln_attn")
        h_attn = layer.ln_attn(x) if two_norms else layer.input_layernorm(x)
        attn = a.dense(self.attend(lc, plan, *self._qkv(a.query_key_value(h_attn))))
        if two_norms:
            return x + layer.mlp(layer.ln_mlp(x)) + attn
        if self.parallel:
            return x + layer.mlp(h_attn) + attn
        x = x + attn
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))
