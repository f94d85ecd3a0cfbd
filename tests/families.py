"""Tiny random-init models of every supported family, and a family-generic dense Λ reference.

The reference runs the HF model's own forward pass and changes only the
attention scores, so everything else (projections, norms, residual layout,
embedding scale, soft-capping ...) is HF's:

* RoPE families: each attention module is called three times, with every token
  rotated to position L (to capture q at the cap), to 0 (unrotated k) and to its
  own position; the last call computes one dense softmax over
  where(local, q_i.k_j, where(global, q_L.k_0, -inf)).  Layers with the model's
  own sliding window no wider than n_local keep just that window.
* ALiBi families: the model's own bias builder is replaced by a dense [H, n, n]
  bias -m_h * d(i, j) with d = i - j in the window, min(i - j, L) for the global
  tokens and -inf elsewhere, read off HF's own bias tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import transformers
from transformers import AutoModelForCausalLM

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Family:
    """A tiny config of one family and how to hook its attention for the reference."""

    name: str
    config: Callable[..., Any]  # (vocab, trained) -> HF config
    hook: str                   # "interface:<modeling module>", "gptj", "falcon", "mpt", "bloom"
    layers: Callable[[Any], list]  # model -> attention modules
    rotary: Callable[[Any], Any] | None = None  # model -> HF rotary module


def _cfg(cls_name: str, **kw):
    def make(vocab: int, trained: int, **over):
        cls = getattr(transformers, cls_name)
        def fill(value):  # "TRAINED" stands for the trained length, at any depth
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return trained if value == "TRAINED" else value
        args = fill({**kw, **over})
        return cls(vocab_size=vocab, attn_implementation=args.pop("attn_implementation", "eager"), **args)
    return make


_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings="TRAINED", tie_word_embeddings=False)
_ROT = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _model_layers(m):
    return [layer.self_attn for layer in m.model.layers]


def _model_rotary(m):
    return m.model.rotary_emb


FAMILIES = [
    Family("llama", _cfg("LlamaConfig", **_LLAMA, **_ROT), "interface:llama", _model_layers, _model_rotary),
    # Every layer slides: Mistral keeps its own 6-token window.
    Family("mistral", _cfg("MistralConfig", **_LLAMA, **_ROT, sliding_window=6), "interface:mistral",
           _model_layers, _model_rotary),
    # Layer 0 full attention, layer 1 sliding (max_window_layers): a per-layer window.
    Family("qwen2", _cfg("Qwen2Config", **_LLAMA, **_ROT, use_sliding_window=True, sliding_window=6,
                         max_window_layers=1), "interface:qwen2", _model_layers, _model_rotary),
    # head_dim 16 != hidden / heads, per-head q/k RMSNorm.
    Family("qwen3", _cfg("Qwen3Config", **_LLAMA, **_ROT, head_dim=16), "interface:qwen3",
           _model_layers, _model_rotary),
    Family("gemma", _cfg("GemmaConfig", **_LLAMA, **_ROT, head_dim=16), "interface:gemma",
           _model_layers, _model_rotary),
    # Alternating sliding / full layers, softcaps small enough to matter, temperature 24 ** -0.5.
    Family("gemma2", _cfg("Gemma2Config", **_LLAMA, **_ROT, head_dim=16, sliding_window=6,
                          attn_logit_softcapping=3.0, final_logit_softcapping=4.0, query_pre_attn_scalar=24),
           "interface:gemma2", _model_layers, _model_rotary),
    Family("phi", _cfg("PhiConfig", **_LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.5}, qk_layernorm=True),
           "interface:phi", _model_layers, _model_rotary),
    Family("phi3", _cfg("Phi3Config", **_LLAMA, **_ROT, pad_token_id=None), "interface:phi3",
           _model_layers, _model_rotary),
    # LongRoPE with partial rotary (Phi-4-mini's layout): trained length = the original 16, short factors.
    Family("phi3-longrope", _cfg("Phi3Config", **{**_LLAMA, "max_position_embeddings": 64}, pad_token_id=None,
                                 original_max_position_embeddings="TRAINED",
                                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                                  "partial_rotary_factor": 0.5,
                                                  "original_max_position_embeddings": "TRAINED",
                                                  "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}),
           "interface:phi3", _model_layers, _model_rotary),
    Family("gpt_neox", _cfg("GPTNeoXConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings="TRAINED", use_parallel_residual=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5}),
           "interface:gpt_neox", lambda m: [la.attention for la in m.gpt_neox.layers],
           lambda m: m.gpt_neox.rotary_emb),
    Family("gpt_neox-sequential", _cfg("GPTNeoXConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings="TRAINED",
                                       use_parallel_residual=False,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.25}),
           "interface:gpt_neox", lambda m: [la.attention for la in m.gpt_neox.layers],
           lambda m: m.gpt_neox.rotary_emb),
    Family("gptj", _cfg("GPTJConfig", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions="TRAINED",
                        tie_word_embeddings=False), "gptj", lambda m: [b.attn for b in m.transformer.h]),
    # Falcon-7B layout: multi-query, parallel attention + MLP, one LayerNorm.
    Family("falcon-mq", _cfg("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                             max_position_embeddings="TRAINED", attn_implementation="sdpa", **_ROT),
           "falcon", lambda m: [b.self_attention for b in m.transformer.h], lambda m: m.transformer.rotary_emb),
    # Falcon-40B/180B layout: grouped KV, two LayerNorms.
    Family("falcon-new", _cfg("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings="TRAINED",
                              attn_implementation="sdpa", **_ROT),
           "falcon", lambda m: [b.self_attention for b in m.transformer.h], lambda m: m.transformer.rotary_emb),
    # Per-head (q, k, v), sequential block.
    Family("falcon-seq", _cfg("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True,
                              max_position_embeddings="TRAINED", attn_implementation="sdpa", **_ROT),
           "falcon", lambda m: [b.self_attention for b in m.transformer.h], lambda m: m.transformer.rotary_emb),
    Family("mpt", _cfg("MptConfig", d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len="TRAINED"),
           "mpt", lambda m: []),
    # 6 heads: the slopes' non-power-of-two branch.
    Family("bloom", _cfg("BloomConfig", hidden_size=48, n_head=6, n_layer=2, seq_length="TRAINED"), "bloom",
           lambda m: []),
]
BY_NAME = {f.name: f for f in FAMILIES}
ROPE = [f.name for f in FAMILIES if f.hook not in ("mpt", "bloom")]

# Parameters whose scale sharpens attention, so that a masking mistake shows.
_QK_NAMES = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "Wqkv")


def build(name: str, vocab: int = 97, trained: int = 16, seed: int = 0, device: str | torch.device = "cpu",
          **over):
    """A random-init model of the named tiny family config."""
    fam = BY_NAME[name]
    torch.manual_seed(seed)
    cfg = fam.config(vocab, trained, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(k in pname for k in _QK_NAMES) and p.dim() == 2:
                p.mul_(4.0)
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# The dense reference


def _masks(n: int, n_local: int, n_global: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    local = (i - j >= 0) & (i - j < n_local)
    glob = (j < n_global) & (i - j >= n_local)
    return local, glob, i - j


def lambda_core(q_loc, k_loc, v, q_cap, k_zero, scale: float, n_local: int, n_global: int,
                window: int | None = None, softcap: float | None = None):
    """Dense Λ attention: q [1, H, n, D], k/v [1, Hkv, n, D] -> [1, H, n, D]."""
    h, hkv, n = q_loc.shape[1], k_loc.shape[1], q_loc.shape[2]
    k_loc, k_zero, v = (t.repeat_interleave(h // hkv, 1) for t in (k_loc, k_zero, v))
    s_loc = (q_loc @ k_loc.transpose(-1, -2)).float() * scale
    s_glob = (q_cap @ k_zero.transpose(-1, -2)).float() * scale
    if softcap is not None:
        s_loc, s_glob = (torch.tanh(s / softcap) * softcap for s in (s_loc, s_glob))
    if window is not None and window <= n_local:
        local, glob, _ = _masks(n, window, 0, q_loc.device)  # the layer's own rule, nothing more
    else:
        local, glob, _ = _masks(n, n_local, n_global, q_loc.device)
    scores = torch.where(local, s_loc, torch.where(glob, s_glob, torch.tensor(NEG_INF, device=q_loc.device)))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


@contextlib.contextmanager
def _short_rope(rotary):
    """Keep a LongRoPE module on its original ('short') frequencies, as lminf does."""
    if rotary is None or getattr(rotary, "rope_type", None) != "longrope":
        yield
        return
    saved = rotary.inv_freq.clone()
    rotary.inv_freq.copy_(rotary.original_inv_freq)
    with mock.patch.object(rotary, "rope_type", "default"):
        yield
    rotary.inv_freq.copy_(saved)


@torch.no_grad()
def dense_lambda_reference(name: str, model, ids: torch.Tensor, n_local: int, n_global: int, limit: int):
    """Full-sequence logits of the Λ rule with the family's distance rule, through HF's own forward."""
    fam = BY_NAME[name]
    if fam.hook in ("mpt", "bloom"):
        return _alibi_reference(fam, model, ids, n_local, n_global, limit)
    n = ids.shape[1]
    dev = ids.device
    state: dict[str, Any] = {}
    rotary = fam.rotary(model) if fam.rotary else None
    # transformers >= 5.24 moved GPT-J's rotary table to one model-level module and its
    # attention behind the attention interface; before that each layer held both.
    gptj_per_layer = fam.hook == "gptj" and not hasattr(model.transformer, "rotary_emb")
    if fam.hook == "gptj" and not gptj_per_layer:
        rotary = model.transformer.rotary_emb

    def core(query, key, value, scale, window=None, softcap=None):
        mode = state["mode"]
        if mode != "lambda":
            state[mode] = query if mode == "q" else key
            return torch.zeros_like(query)
        return lambda_core(query, key, value, state["q"], state["k"], scale, n_local, n_global, window, softcap)

    def positions_kw(pos):
        pos = pos.reshape(1, n).to(dev)
        if gptj_per_layer:
            return {"position_ids": pos}
        dummy = torch.zeros(1, device=dev, dtype=next(model.parameters()).dtype)
        return {"position_embeddings": rotary(dummy, pos)}

    def wrap(orig):
        def forward(*args, **kw):
            for mode, pos in (("q", torch.full((n,), limit)), ("k", torch.zeros(n, dtype=torch.long))):
                state["mode"] = mode
                orig(*args, **{**kw, **positions_kw(pos)})
            state["mode"] = "lambda"
            return orig(*args, **{**kw, **positions_kw(torch.arange(n))})
        return forward

    with contextlib.ExitStack() as stack:
        stack.enter_context(_short_rope(rotary))
        for attn in fam.layers(model):
            stack.enter_context(mock.patch.object(attn, "forward", wrap(attn.forward)))

        def eager(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  softcap=None, **kw):
            out = core(query, key, value, scaling, sliding_window, softcap)
            return out.transpose(1, 2).contiguous(), None

        if fam.hook.startswith("interface:"):
            module = getattr(transformers.models, fam.hook.split(":")[1])
            modeling = getattr(module, f"modeling_{fam.hook.split(':')[1]}")
            stack.enter_context(mock.patch.object(modeling, "eager_attention_forward", eager))
        elif fam.hook == "gptj":
            from transformers.models.gptj import modeling_gptj
            # HF's sinusoid table stops at the trained length; the reference rotates to L and beyond.
            size = max(n, limit + 1)
            if gptj_per_layer:
                for attn in fam.layers(model):
                    table = modeling_gptj.create_sinusoidal_positions(size, attn.pos_embd_dim).to(dev)
                    stack.enter_context(mock.patch.object(attn, "embed_positions", table))
                    stack.enter_context(mock.patch.object(
                        attn, "_attn", lambda q, k, v, mask=None, a=attn: (core(q, k, v, 1.0 / a.scale_attn), None)))
            else:
                table = modeling_gptj.create_sinusoidal_positions(size, rotary.pos_embd_dim).to(dev)
                stack.enter_context(mock.patch.object(rotary, "embed_positions", table))
                stack.enter_context(mock.patch.object(modeling_gptj, "eager_attention_forward", eager))
        elif fam.hook == "falcon":
            def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
                return core(query, key, value, scale or query.shape[-1] ** -0.5)
            stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa))
        return model(ids, use_cache=False).logits


def _alibi_reference(fam: Family, model, ids, n_local: int, n_global: int, limit: int):
    n = ids.shape[1]
    body = model.transformer
    local, glob, dist = _masks(n, n_local, n_global, torch.device("cpu"))
    d = torch.where(glob, dist.clamp(max=limit), dist).clamp(min=0)            # [n, n]
    size = max(n, limit) + 1
    if fam.hook == "bloom":
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor
        per_pos = build_alibi_tensor(torch.ones(1, size), model.config.n_head, torch.float32)[:, 0]  # m_h * p
        bias = -per_pos[:, d]                                                   # [H, n, n]
    else:
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
        per_pos = build_mpt_alibi_tensor(model.config.n_heads, size)[:, 0]     # m_h * (p - size + 1)
        bias = per_pos[:, size - 1 - d]                                         # [H, n, n]
    bias = bias.masked_fill(~(local | glob), NEG_INF).to(ids.device)
    if fam.hook == "bloom":
        patch = mock.patch.object(body, "build_alibi_tensor", lambda mask, h, dtype: bias.to(dtype))
    else:
        patch = mock.patch.object(body, "build_mpt_alibi_tensor", lambda *a, **k: bias)
    with torch.no_grad(), patch:
        # BLOOM builds its bias through build_alibi_tensor only when given a mask.
        return model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
