"""Llama-family adapter: Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM (RoPE, GQA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import quant, step_script
from ..cache import LambdaCache, LayerCache, StepPlan
from .base import config_layer_windows, execution_device, register, rope_from_hf
from .decoder import GATED_MLPS, PLAIN_RMS_NORMS, SILU_ACTIVATIONS, DecoderAdapter

# The blocks' tensors for step_script.llama_layers: weights, biases and kinds per block, every norm's eps.
ScriptBlocks = tuple[list[list[Tensor]], list[list[Tensor | None]], list[list[str]], list[float]]


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

    def decode_layers(self, x: Tensor, cache: LambdaCache, plan: StepPlan) -> Tensor | None:
        rings = cache.script_rings(plan) if step_script.enabled() else None
        blocks = self._script_blocks(x.dtype) if rings is not None else None
        if blocks is None:
            return None
        # With the native kernels: the same operations as llama_layers, looped in C++ (native.py).
        if step_script.native_attend(rings[0][0], self.head_dim) and step_script.native_norm(x, blocks[0][0][0]):
            weights, biases, kinds, eps = self._native_blocks(x.dtype)
            y = torch.ops.lminf.llama_layers(
                x.view(1, -1), weights, biases, kinds, eps, cache.native_rings(plan), plan.step_mat,
                plan.ring_span[0], plan.ring_view, plan.local_bias, plan.global_bias, plan.global_view, cache.scale,
                self.n_heads, self.n_kv_heads, self.head_dim, quant.GROUP)
        else:
            y = step_script.scripted(step_script.llama_layers)(
                x.view(1, -1), *blocks, rings, plan.step_mat,
                plan.ring_span[0], plan.ring_view, plan.local_bias, plan.global_bias, plan.global_view, cache.scale,
                self.n_heads, self.n_kv_heads, self.head_dim)
        return y.view(x.shape)

    def _native_blocks(self, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor | None], list[int], list[float]]:
        """_script_blocks flattened for lminf::llama_layers (its schema takes no nested lists): every
        layer's 10 weights, 4 biases, 4 kinds as bits (4 or 8), then the eps.  Made once per dtype."""
        known = self._script[1]
        key = ("native", dtype)
        if key not in known:
            weights, biases, kinds, eps = self._script_blocks(dtype)
            known[key] = ([t for w in weights for t in w], [t for b in biases for t in b],
                          [4 if k == "int4" else 8 for ks in kinds for k in ks], list(eps))
        return known[key]

    def _script_blocks(self, dtype: torch.dtype) -> ScriptBlocks | None:
        """Each block's tensors for step_script.llama_layers in activations of `dtype`, or None when a
        block is not the plain one it computes: RMSNorm, q/k/v and gate/up fused (quantized, on the
        CPU), o and down quantized, SiLU, no q/k norm, no accelerate hook, no partial RoPE scaling.
        Found once per dtype and set of fused projections."""
        if self._script[0] is not self.fused:  # fuse_projections ran again, or the fusions were replaced
            self._script = (self.fused, {})
        known = self._script[1]
        if dtype in known:
            return known[dtype]
        blocks: ScriptBlocks | None = ([], [], [], [])
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            qkv, gate_up = self.fused.get(attn), self.fused.get(mlp)
            outs = (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None))
            if (qkv is None or gate_up is None or hasattr(attn, "q_norm") or self.rotary_scale != 1.0
                    or type(mlp).__name__ not in GATED_MLPS
                    or type(getattr(mlp, "act_fn", None)).__name__ not in SILU_ACTIVATIONS
                    or any(type(m) is not quant.QuantizedLinear for m in outs)
                    or any(type(n).__name__ not in PLAIN_RMS_NORMS or n.weight.dtype != dtype for n in norms)
                    or any(hasattr(m, "_hf_hook") for m in layer.modules())):
                blocks = None
                break
            for f in (qkv, gate_up):  # as FusedProjection does when the model was cast after fusing
                if f.bias is not None and f.bias.dtype != dtype:
                    f.bias = f.bias.to(dtype)
            o, down = outs
            weights, biases, kinds, eps = blocks
            weights.append([n.weight for n in norms] + [*qkv.tensors(), o.qweight, o.qscales, *gate_up.tensors(),
                                                        down.qweight, down.qscales])
            biases.append([qkv.bias, o.bias, gate_up.bias, down.bias])
            kinds.append([qkv.kind, o.kind, gate_up.kind, down.kind])
            eps += [float(n.variance_epsilon) for n in norms]
        known[dtype] = blocks
        return blocks

    def head(self, x: Tensor) -> Tensor:
        # Each .to is a no-op unless a device map put the norm and the head elsewhere.
        return self.lm_head(self.norm(x.to(execution_device(self.norm))).to(execution_device(self.lm_head)))
