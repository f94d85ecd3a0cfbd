"""GPT-NeoX / Pythia adapter: fused per-head qkv, partial rotate-half rotary."""

from __future__ import annotations

from torch import Tensor, nn

from ..cache import LayerCache, StepPlan
from .base import register, rope_from_hf
from .decoder import DecoderAdapter


@register
class NeoXAdapter(DecoderAdapter):
    """Multi-head attention; rotary on the first rotary_pct of each head.

    With use_parallel_residual (Pythia) attention and MLP both read x; otherwise
    the MLP reads the attention output, as in HF.
    """

    family = "gpt_neox"
    model_types = ("gpt_neox",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        body = model.gpt_neox
        self.embed_in, self.layers, self.norm = body.embed_in, body.layers, body.final_layer_norm
        self.lm_head = model.lm_head if hasattr(model, "lm_head") else model.embed_out  # renamed in transformers 5
        self.n_layers = len(self.layers)
        self.n_heads = self.n_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.n_heads
        self.rope = rope_from_hf(body.rotary_emb, self.head_dim)
        self.scale = float(self.layers[0].attention.scaling)
        self.split_rotary_scaling()

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_in(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.attention
        c = x.shape[1]
        qkv = a.query_key_value(layer.input_layernorm(x)).view(1, c, self.n_heads, 3 * self.head_dim)
        q, k, v = qkv.chunk(3, dim=-1)  # each [1, C, H, D]: per head (q, k, v)
        attn = a.dense(self.attend(lc, plan, q, k, v))
        if layer.use_parallel_residual:
            return x + attn + layer.mlp(layer.post_attention_layernorm(x))
        x = x + attn
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
