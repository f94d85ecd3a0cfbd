"""The contract every architecture adapter fulfils, and the adapter registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import kernels, quant
from ..attention import Rope
from ..cache import LambdaCache, StepPlan
from ..errors import ModelError
from ..memory import kv_cache_bytes
from ..ring import ring_nbytes
from ..settings import LambdaSettings

Rows = slice | None


class Adapter:
    """Runs one model family's forward pass through a LambdaCache.

    An adapter reads the shapes and the rotary embedding off a loaded HF model
    and re-uses its modules (projections, norms, MLP), replacing only attention
    and the KV cache.  `forward` runs one planned step (the engine plans and
    commits it: see LambdaCache) and returns logits for the requested rows only:
    full-sequence logits are never built.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        # Families without max_position_embeddings (BLOOM, MPT) set it themselves.
        self.trained_length: int = int(getattr(self.config, "max_position_embeddings", 0) or 0)
        self.fused = {}
        # (the `fused` they were found with, dtype -> the blocks' tensors for step_script or None)
        self._script: tuple[dict, dict[torch.dtype, tuple | None]] = (self.fused, {})

    # Shapes every adapter sets in __init__.
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: Rope
    scale: float
    softcap: float | None = None  # attention-logit soft-capping (Gemma 2)

    # Module -> its fused quantized projections (fuse_projections); empty until the model is quantized.
    fused: dict[nn.Module, quant.FusedProjection]

    def fuse_projections(self) -> None:
        """Called once the model's linear layers hold packed copies (quant.install): fuse what shares
        an input into one kernel call for decode steps, into `fused` (nothing here)."""
        self.fused = {}

    def layer_windows(self) -> list[int | None]:
        """The model's own sliding window of each layer (None: full attention)."""
        return [None] * self.n_layers

    def max_local(self) -> int | None:
        """A window the model itself imposes on every layer (sliding-window attention), if any."""
        windows = self.layer_windows()
        if windows and all(w is not None for w in windows):
            return max(windows)
        return None

    def new_cache(self, settings: LambdaSettings, fused: bool = True) -> LambdaCache:
        """An empty cache shaped for this model (its layers on the devices their model layers run on)."""
        return LambdaCache(self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.rope, settings,
                           device=main_device(self.model), dtype=self.cache_dtype(), scale=self.scale, fused=fused,
                           softcap=self.softcap, layer_windows=self.layer_windows(),
                           layer_devices=self.layer_devices())

    def cache_dtype(self) -> torch.dtype:
        """The dtype keys and values are computed in: the embeddings' (quantized layers keep packed
        integer weights, but compute in the dtype of the activations they are given)."""
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        p = next((emb if emb is not None else self.model).parameters())
        return p.dtype if p.is_floating_point() else torch.float32

    def cache_bytes(self, settings: LambdaSettings) -> int:
        """Bytes the ring and global buffers of a cache with these settings take (before making one)."""
        dt = self.cache_dtype()
        ring = ring_nbytes(settings.kv_quantize, self.n_kv_heads, settings.ring_size, self.head_dim, dt)
        glob = kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, settings.n_global, dt)
        return self.n_layers * ring + glob

    def layer_devices(self) -> list[torch.device]:
        """Device each decoder layer runs on (they differ when a device map splits the model).

        Families whose layers are in `self.layers` get each layer's own; others run on one device.
        """
        layers = getattr(self, "layers", None)
        if layers is not None and len(layers) == self.n_layers:
            return [execution_device(layer) for layer in layers]
        return [main_device(self.model)] * self.n_layers

    def forward(self, ids: Tensor, cache: LambdaCache, plan: StepPlan, rows: Rows = None) -> Tensor | None:
        """Run ids [1, C] through the model under `plan`, storing their K/V in the cache's
        layers; logits [1, len(rows), V] for `rows`, or None."""
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
    """Read inv_freq (any rope_type: default, llama3, yarn ...) off an HF rotary module.

    `original_inv_freq` is preferred: dynamic and LongRoPE modules overwrite
    `inv_freq` in place once they have seen a long input.
    """
    inv_freq = getattr(rotary_emb, "original_inv_freq", rotary_emb.inv_freq).detach()
    if inv_freq.dtype != torch.float32:
        # model.to(bfloat16) casts these buffers too: a bf16 frequency is off by up to 2^-9 relative,
        # i.e. radians at distances in the thousands, and a state saved in one precision would not
        # match the other.  The module still knows how it made them: build them again in float32.
        inv_freq = _float32_inv_freq(rotary_emb, inv_freq)
    inv_freq = inv_freq.float().cpu()
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    return Rope(inv_freq=inv_freq, head_dim=head_dim, rotary_dim=2 * inv_freq.numel(),
                interleaved=interleaved, scaling=scaling)


def _float32_inv_freq(rotary_emb: nn.Module, cast: Tensor) -> Tensor:
    """The inverse frequencies an HF rotary module computed at construction, in float32, when its
    buffers have since been cast to a lower precision (`cast`).

    A fresh module of the same class, built from the same config, computes them again (any
    rope_type).  The result is used only if it rounds to the cast values: if the module cannot be
    rebuilt, or was built otherwise, the cast buffer is kept rather than trusting a guess.
    """
    config = getattr(rotary_emb, "config", None)
    if config is None:
        return cast
    try:
        with torch.device("cpu"):
            fresh = type(rotary_emb)(config)
        inv_freq = getattr(fresh, "original_inv_freq", fresh.inv_freq).detach().float().cpu()
    except Exception:  # noqa: BLE001 - any failure to rebuild means: keep what the model holds
        return cast
    if inv_freq.shape != cast.shape or not torch.equal(inv_freq.to(cast.dtype), cast.cpu()):
        return cast
    return inv_freq


def config_layer_windows(config, n_layers: int) -> list[int | None]:
    """Per-layer sliding windows as HF applies them.

    With `layer_types` (Qwen2/3, Gemma 2) only "sliding_attention" layers slide;
    without it (Mistral, Phi-3) a set `sliding_window` applies to every layer.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return [None] * n_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:n_layers]]


def no_grad_forward(fn: Callable) -> Callable:
    """Run an adapter forward under inference mode (no autograd bookkeeping), its
    few-row projections on the batched CPU kernel (kernels.py)."""
    def wrapper(*args, **kwargs):
        with torch.inference_mode(), kernels.few_row_projections():
            return fn(*args, **kwargs)
    wrapper.__doc__ = fn.__doc__
    return wrapper


def execution_device(module: nn.Module) -> torch.device:
    """The device a module runs on: where its weights are, or, when accelerate offloads them
    (to the CPU or disk: they are on the meta device between forwards), its hook's device."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def main_device(model: nn.Module) -> torch.device:
    """Where a model's input goes: its embeddings' execution device (see execution_device)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)
