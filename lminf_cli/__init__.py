"""lminf: read documents far beyond a model's trained length with LM-Infinite."""

__version__ = "0.1.0"
