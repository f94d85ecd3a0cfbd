"""Architecture adapters behind one registry keyed by the HF model_type."""

# Each module registers its adapters on import.
from . import alibi, falcon, gemma, gptj, llama, neox, phi, phi3  # noqa: F401
from .base import Adapter, adapter_for, register, supported_model_types

__all__ = ["Adapter", "adapter_for", "register", "supported_model_types"]
