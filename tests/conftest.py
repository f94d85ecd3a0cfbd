"""Tiny random-init models and a naive dense reference of Λ-attention."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The few-row CPU kernel (kernels.py) is on in the suite whatever this machine's measured verdict
# is: its results must equal F.linear's everywhere, and the suite must not depend on timings.
os.environ.setdefault("LMINF_FEW_ROW", "on")

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from lminf_cli import native  # noqa: E402

# The native decode attention is built (or found) once, before any test points $LMINF_CACHE at a
# temporary or impossible folder: whether a test runs it must not depend on the order of the tests.
native.available()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_llama(n_heads: int = 4, n_kv_heads: int = 2, trained: int = 16, layers: int = 2, seed: int = 0,
               model_type: str = "llama", **extra):
    """A random-init Llama-family model small enough to check exactly."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=trained, rope_theta=10000.0, tie_word_embeddings=False,
                      attn_implementation="eager", **extra)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Larger than default weights make attention patterns sharp, so masking mistakes show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    return model.to(DEVICE).eval()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_at(model, x, positions):
    """Rotate x [1, h, n, d] at integer positions with HF's own rotary module."""
    pos = torch.as_tensor(positions, device=x.device).reshape(1, -1)
    cos, sin = model.model.rotary_emb(x, pos)  # [1, n, d]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def lambda_masks(model, ids, n_local: int, n_global: int):
    """Shapes and the Λ rule's masks for a dense reference: (n, h, hkv, d, local, global, middle) with
    local = 0 <= i - j < n_local, global = j < n_global beyond it, middle = the rest beyond it."""
    cfg = model.config
    n = ids.shape[1]
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    i = torch.arange(n, device=ids.device)[:, None]
    j = torch.arange(n, device=ids.device)[None, :]
    far = i - j >= n_local
    return (n, h, hkv, cfg.hidden_size // h, (i - j >= 0) & ~far, (j < n_global) & far,
            (j >= n_global) & far)


@torch.no_grad()
def dense_lambda_logits(model, ids, n_local: int, n_global: int, limit: int):
    """Full-sequence logits of the Λ rule computed the slow, obvious way.

    Local branch: 0 <= i - j < n_local at true distance; global branch: j < n_global
    and i - j >= n_local at distance `limit`; one softmax over both.
    """
    n, h, hkv, d, local, glob, _ = lambda_masks(model, ids, n_local, n_global)
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        a = layer.self_attn
        hs = layer.input_layernorm(x)
        q = a.q_proj(hs).view(1, n, h, d).transpose(1, 2)
        k = a.k_proj(hs).view(1, n, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, 1)
        v = a.v_proj(hs).view(1, n, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, 1)
        s_local = rope_at(model, q, range(n)) @ rope_at(model, k, range(n)).transpose(-1, -2)
        s_glob = rope_at(model, q, [limit] * n) @ rope_at(model, k, [0] * n).transpose(-1, -2)
        scores = torch.where(local, s_local, torch.where(glob, s_glob, torch.tensor(float("-inf"))))
        p = torch.softmax(scores / d ** 0.5, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(1, n, h * d)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


@pytest.fixture
def device():
    return DEVICE


CORPUS = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
          "Call me Ishmael. It was the best of times, it was the worst of times. "
          "All happy families are alike; every unhappy family is unhappy in its own way. ") * 4


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved random-init Llama with a real tokenizer: a model directory for the CLI."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _cpu_without_bf16():
    """`--dtype auto` picks float32 on the CPU in the suite, as on a CPU without bfloat16
    instructions, so that every machine runs the same tests in the same precision;
    tests/test_precision.py covers bfloat16 and the probe itself.  Session-wide, so that a
    model a module-scoped fixture loads is in the same precision as one a test loads."""
    from lminf_cli import kernels

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "cpu_bf16_feature", lambda: None)
        yield


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread (and do not suffer from a busy machine);
    tests on the real embedded model keep every core."""
    if request.node.get_closest_marker("embedded"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
