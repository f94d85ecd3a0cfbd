"""The forward loop every adapter shares.

A family adapter says how to embed, how one block runs (re-using the HF
modules: projections, norms, MLP) and how the head reads the last hidden state;
attention always goes through the layer's cache, under the step's plan.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from .. import quant, step_script
from ..cache import LambdaCache, LayerCache, StepPlan
from .base import Adapter, Rows, no_grad_forward, rope_from_hf

# HF MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (read in transformers'
# sources): their gate and up projections can run as one (fuse_projections).
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP"})
# HF RMSNorm classes computing weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype): torch's fused
# rms_norm gives the same values in 3 operations instead of 8 (`apply_norm`).
PLAIN_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# Activation modules computing F.silu (torch's and transformers' own, ACT2FN["silu"]).
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})


class DecoderAdapter(Adapter):
    """Embed -> blocks -> head, with a Λ cache in place of each block's KV cache."""

    final_softcap: float | None = None  # logit soft-capping of the head (Gemma 2)
    rotary_scale: float = 1.0           # see split_rotary_scaling

    layers: nn.ModuleList

    def fuse_projections(self) -> None:
        """Quantized projections of one input as one kernel call a decode step: q/k/v of every
        attention module (`project_qkv`) and gate/up of the gated MLPs (`mlp`)."""
        self.fused = {}
        for module in self.model.modules():
            if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj")):
                parts = [module.q_proj, module.k_proj, module.v_proj]
            elif type(module).__name__ in GATED_MLPS:
                parts = [module.gate_proj, module.up_proj]
            else:
                continue
            fused = quant.fuse(parts)
            if fused is not None:
                self.fused[module] = fused

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [1, C] -> hidden states [1, C, hidden]."""
        raise NotImplementedError

    def decode_layers(self, x: Tensor, cache: LambdaCache, plan: StepPlan) -> Tensor | None:
        """Every block for a one-token step x [1, 1, hidden] in one scripted call (step_script), when
        the model and the step fit it; None: the blocks run one by one (`block`)."""
        return None

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
        """The q/k/v projections (q_proj, k_proj, v_proj) of h [1, C, hidden], split into heads:
        one fused product for a decode step when the layers are quantized, else three."""
        fused = self.fused.get(attn)
        qkv = fused(h) if fused is not None else None
        if qkv is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = qkv.split(fused.sizes, dim=-1)
        return (heads_view(q, self.n_heads, self.head_dim),     # [1, C, H, D]
                heads_view(k, self.n_kv_heads, self.head_dim),  # [1, C, Hkv, D]
                heads_view(v, self.n_kv_heads, self.head_dim))

    def apply_norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        """norm(x), through torch's fused rms_norm for the plain RMSNorm classes."""
        # (A module under an accelerate hook gets its weight only inside its own forward.)
        if type(norm).__name__ not in PLAIN_RMS_NORMS or hasattr(norm, "_hf_hook"):
            return norm(x)
        return step_script.rms_norm(x, norm.weight, norm.variance_epsilon, step_script.native_norm(x, norm.weight))

    def mlp(self, mlp: nn.Module, h: Tensor) -> Tensor:
        """The block's MLP on h: gate and up as one product for a decode step when fused."""
        fused = self.fused.get(mlp)
        gate_up = fused(h) if fused is not None else None
        if gate_up is None:
            return mlp(h)
        gate, up = gate_up.split(fused.sizes, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def logits(self, x: Tensor) -> Tensor:
        """Head output with the family's final soft-capping, if any."""
        out = self.head(x)
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    @no_grad_forward
    def forward(self, ids: Tensor, cache: LambdaCache, plan: StepPlan, rows: Rows = None) -> Tensor | None:
        x = self.embed(ids)  # [1, C, hidden]
        stack = self.decode_layers(x, cache, plan) if plan.n_new == 1 else None
        if stack is not None:
            x = stack
        else:
            for layer, lc in zip(self.layers, cache.layers, strict=True):
                x = self.block(layer, x.to(lc.device), lc, plan)  # .to: a no-op unless a device map split the model
        if rows is None:
            return None
        return self.logits(x[:, rows])  # [1, rows, V]


def heads_view(x: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """[1, C, n_heads * head_dim] -> [1, C, n_heads, head_dim] (a view: x may be a slice of a fused product)."""
    return x.view(1, x.shape[1], n_heads, head_dim)
