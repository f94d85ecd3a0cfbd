"""The contract every architecture adapter fulfils, and the adapter registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..attention import Rope
from ..cache import LambdaCache, LambdaSettings
from ..errors import ModelError

Rows = slice | None


class Adapter:
    """Runs one model family's forward pass through a LambdaCache.

    An adapter reads the shapes and the rotary embedding off a loaded HF model
    and re-uses its modules (projections, norms, MLP), replacing only attention
    and the KV cache.  `forward` adds a block of tokens to the cache and returns
    logits for the requested rows only: full-sequence logits are never built.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.trained_length: int = int(self.config.max_position_embeddings)

    # Shapes every adapter sets in __init__.
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: Rope
    scale: float

    def max_local(self) -> int | None:
        """A window the model itself imposes (sliding-window attention), if any."""
        return None

    def new_cache(self, settings: LambdaSettings, max_chunk: int, fused: bool = True,
                  rebase_every: int | None = None) -> LambdaCache:
        """An empty cache shaped for this model."""
        p = next(self.model.parameters())
        return LambdaCache(self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.rope, settings,
                           max_chunk, device=p.device, dtype=p.dtype, scale=self.scale, fused=fused,
                           rebase_every=rebase_every, layer_devices=self.layer_devices())

    def layer_devices(self) -> list[torch.device]:
        """Device of each decoder layer (they differ when a device map splits the model)."""
        p = next(self.model.parameters())
        return [p.device] * self.n_layers

    def forward(self, ids: Tensor, cache: LambdaCache, rows: Rows = None) -> Tensor | None:
        """Add ids [1, C] to the cache; logits [1, len(rows), V] for `rows`, or None."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available for its HF model_types."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    """The HF model_type values lminf can run."""
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a loaded HF causal LM, or a ModelError naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    cls = _REGISTRY.get(model_type or "")
    if cls is None:
        raise ModelError(f"architecture '{model_type}' is not supported; supported: "
                         + ", ".join(supported_model_types()))
    return cls(model)


def rope_from_hf(rotary_emb: nn.Module, head_dim: int, interleaved: bool = False) -> Rope:
    """Read inv_freq (any rope_type: default, llama3, yarn ...) off an HF rotary module."""
    inv_freq = rotary_emb.inv_freq.detach().float().cpu()
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    return Rope(inv_freq=inv_freq, head_dim=head_dim, rotary_dim=2 * inv_freq.numel(),
                interleaved=interleaved, scaling=scaling)


def no_grad_forward(fn: Callable) -> Callable:
    """Run an adapter forward under inference mode (no autograd bookkeeping)."""
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)
    wrapper.__doc__ = fn.__doc__
    return wrapper
