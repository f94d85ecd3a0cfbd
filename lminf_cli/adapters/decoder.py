"""The forward loop every adapter shares.

A family adapter says how to embed, how one block runs (re-using the HF
modules: projections, norms, MLP) and how the head reads the last hidden state;
attention always goes through the layer's cache, under the step's plan.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..cache import LambdaCache, LayerCache, StepPlan
from .base import Adapter, Rows, no_grad_forward, rope_from_hf


class DecoderAdapter(Adapter):
    """Embed -> blocks -> head, with a Λ cache in place of each block's KV cache."""

    final_softcap: float | None = None  # logit soft-capping of the head (Gemma 2)
    rotary_scale: float = 1.0           # see split_rotary_scaling

    layers: nn.ModuleList

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [1, C] -> hidden states [1, C, hidden]."""
        raise NotImplementedError

    def block(self, layer: nn.Module, x: Tensor, lc: LayerCache, plan: StepPlan) -> Tensor:
        """One decoder block on x [1, C, hidden], attending through `lc`."""
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: [1, R, hidden] -> logits [1, R, V]."""
        raise NotImplementedError

    def read_hf_body(self, model: nn.Module, norm: nn.Module) -> None:
        """Modules and shapes of the common HF layout (model.model.layers[i].self_attn)."""
        body, cfg = model.model, self.config
        self.embed_tokens, self.layers, self.norm, self.lm_head = body.embed_tokens, body.layers, norm, model.lm_head
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.rope = rope_from_hf(body.rotary_emb, self.head_dim)
        self.scale = float(attn.scaling)

    def split_rotary_scaling(self) -> None:
        """Move a RoPE attention scaling (YaRN, LongRoPE) out of the cache when only part of the head rotates.

        HF scales cos and sin, i.e. only the rotated dims of q and k; the cache
        would scale the whole head, so the adapter scales the rotated dims itself.
        """
        if self.rope.scaling != 1.0 and self.rope.rotary_dim < self.head_dim:
            self.rotary_scale = self.rope.scaling
            self.rope = replace(self.rope, scaling=1.0)

    def attend(self, lc: LayerCache, plan: StepPlan, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [1, C, H, D], k/v [1, C, Hkv, D], unrotated -> attention output [1, C, H * D]."""
        c = q.shape[1]
        if self.rotary_scale != 1.0:
            r, s = self.rope.rotary_dim, self.rotary_scale
            q = torch.cat([q[..., :r] * s, q[..., r:]], dim=-1)
            k = torch.cat([k[..., :r] * s, k[..., r:]], dim=-1)
        o = lc.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), plan)  # [1, H, C, D]
        return o.transpose(1, 2).reshape(1, c, self.n_heads * self.head_dim)

    def project_qkv(self, attn: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Separate q/k/v projections (q_proj, k_proj, v_proj) of h [1, C, hidden], split into heads."""
        return (heads_view(attn.q_proj(h), self.n_heads, self.head_dim),     # [1, C, H, D]
                heads_view(attn.k_proj(h), self.n_kv_heads, self.head_dim),  # [1, C, Hkv, D]
                heads_view(attn.v_proj(h), self.n_kv_heads, self.head_dim))

    def logits(self, x: Tensor) -> Tensor:
        """Head output with the family's final soft-capping, if any."""
        out = self.head(x)
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    @no_grad_forward
    def forward(self, ids: Tensor, cache: LambdaCache, plan: StepPlan, rows: Rows = None) -> Tensor | None:
        x = self.embed(ids)  # [1, C, hidden]
        for layer, lc in zip(self.layers, cache.layers, strict=True):
            x = self.block(layer, x.to(lc.device), lc, plan)  # .to: a no-op unless a device map split the model
        if rows is None:
            return None
        return self.logits(x[:, rows])  # [1, rows, V]


def heads_view(x: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """[1, C, n_heads * head_dim] -> [1, C, n_heads, head_dim]."""
    return x.view(1, x.shape[1], n_heads, head_dim)
