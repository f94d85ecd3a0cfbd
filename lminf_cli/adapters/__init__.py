"""Architecture adapters behind one registry keyed by the HF model_type."""

from . import llama  # noqa: F401  (registers itself)
from .base import Adapter, adapter_for, register, supported_model_types

__all__ = ["Adapter", "adapter_for", "register", "supported_model_types"]
