"""ALiBi adapters: MPT and BLOOM.  A per-head linear bias replaces rotation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import AlibiCache, LambdaCache, LayerCache, StepPlan
from ..settings import LambdaSettings
from .base import register
from .decoder import DecoderAdapter, heads_view

# BLOOM's config has no length field; its models were trained on 2048-token sequences.
BLOOM_TRAINED_LENGTH = 2048


class AlibiAdapter(DecoderAdapter):
    """Shared by the ALiBi families: the slopes come from the HF model's own builder."""

    slopes: Tensor  # [H]

    def new_cache(self, settings: LambdaSettings, fused: bool = True) -> LambdaCache:
        p = next(self.model.parameters())
        return AlibiCache(self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.slopes, settings,
                          device=p.device, dtype=p.dtype, scale=self.scale, fused=fused)


@register
class MptAdapter(AlibiAdapter):
    """MPT: fused [q; k; v] (optionally clipped), bias-free LayerNorms, sequential block."""

    family = "mpt"
    model_types = ("mpt",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        body = model.transformer
        self.wte, self.layers, self.norm, self.lm_head = body.wte, body.blocks, body.norm_f, model.lm_head
        self.trained_length = int(cfg.max_seq_len)
        self.n_layers = len(self.layers)
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.scale = float(self.layers[0].attn.softmax_scale)
        # HF's bias over keys (1 - S .. 0) is -m_h * distance; two keys give the slopes.
        self.slopes = -body.build_mpt_alibi_tensor(self.n_heads, 2, device="cpu")[:, 0, 0].float()

    def embed(self, ids: Tensor) -> Tensor:
        return self.wte(ids)

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.attn
        qkv = a.Wqkv(layer.norm_1(x))
        if a.clip_qkv:
            qkv = qkv.clamp(min=-a.clip_qkv, max=a.clip_qkv)
        q, k, v = (heads_view(t, self.n_heads, self.head_dim) for t in qkv.chunk(3, dim=-1))  # [1, C, H, D]
        x = x + a.out_proj(self.attend(lc, plan, q, k, v))
        return layer.ffn(layer.norm_2(x), x)  # adds its residual itself

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))


@register
class BloomAdapter(AlibiAdapter):
    """BLOOM: LayerNorm after the embedding, per-head (q, k, v) fused projection."""

    family = "bloom"
    model_types = ("bloom",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        body = model.transformer
        self.wte, self.wte_norm = body.word_embeddings, body.word_embeddings_layernorm
        self.layers, self.norm, self.lm_head = body.h, body.ln_f, model.lm_head
        self.trained_length = int(getattr(cfg, "seq_length", None) or BLOOM_TRAINED_LENGTH)
        self.n_layers = len(self.layers)
        self.n_heads = self.n_kv_heads = cfg.n_head
        self.head_dim = cfg.hidden_size // cfg.n_head
        self.scale = float(self.layers[0].self_attention.inv_norm_factor)
        # HF's bias over key positions (0, 1, ...) is m_h * j; two keys give the slopes.
        self.slopes = body.build_alibi_tensor(torch.ones(1, 2), self.n_heads, torch.float32)[:, 0, 1].float()

    def embed(self, ids: Tensor) -> Tensor:
        return self.wte_norm(self.wte(ids))

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        a = layer.self_attention
        c = x.shape[1]
        h = layer.input_layernorm(x)
        residual = h if layer.apply_residual_connection_post_layernorm else x
        qkv = a.query_key_value(h).view(1, c, self.n_heads, 3, self.head_dim)  # per head (q, k, v)
        x = a.dense(self.attend(lc, plan, qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])) + residual
        h = layer.post_attention_layernorm(x)
        return layer.mlp(h, h if layer.apply_residual_connection_post_layernorm else x)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))
