"""The one settings object of the Λ engine: attention shape, prefill chunk, retrieval.

`LambdaSettings` is frozen and validates itself once, in `__post_init__`, whoever builds it
(the CLI's options, the bench, a state file's header, a test): every later user can trust
its fields.  Errors name the setting (`n_local`), not a command-line flag; the CLI maps
setting names to its flags when it prints them.

`for_model` fills what was not given from the model's trained length L (the paper's
defaults, or the retrieval recipe); `to_dict`/`from_dict` are its only serialised form
(state headers, bench and eval reports).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .errors import SettingsError

DEFAULT_N_GLOBAL = 100  # the paper's range is 10-100; 0 breaks the model (a plain sliding window)
# Prefill block.  Measured on 2 CPU cores with SmolLM2-135M, window full, local branch split:
# 4.19 ms per token at 256-token chunks, 3.80 at 512, 3.95 at 1024.  On an H100 with a
# Llama-2-7B shape (graphed chunks, 32k tokens): 256 -> 3.3 s, 512 -> 2.6 s, 1024 -> 2.4 s;
# 512 keeps the ring (n_local + chunk) small.  So 512 everywhere.
DEFAULT_CHUNK_SIZE = 512
RETRIEVAL_TOP_K = 5  # the paper's k; the passkey grid found no gain from more
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
# Upper bound on any token count a setting may hold: far beyond any machine's memory, small
# enough that index arithmetic and float64 angles stay exact.
MAX_TOKENS = 1 << 40

# The settings that only steer retrieval; everything else decides what a cache holds.
RETRIEVAL_KNOBS = ("middle_top_k", "middle_from_layer", "middle_distance", "middle_blocks", "middle_unit")
MIDDLE_UNITS = ("token", "block")
KV_QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class LambdaSettings:
    """Attention shape: n_global first tokens, n_local window, distance cap L; prefill chunk; retrieval."""

    n_global: int
    n_local: int
    limit_distance: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Top-k middle retrieval (paper, final version); 0 turns it off.
    middle_top_k: int = 0
    middle_from_layer: int = 4
    middle_distance: int = 0
    middle_block: int = 64
    middle_blocks: int = 16         # blocks each KV head reads per search; 0 = exact search of the whole store
    middle_dtype: str = "auto"      # store precision; auto = float16 for a float32 model, else the model's
    middle_dir: str | None = None   # keep the store in memory-mapped files here instead of RAM
    middle_unit: str = "token"      # what top-k counts: tokens, or whole blocks of middle_block tokens
    kv_quantize: str = "none"       # the window's keys and values: in the model's dtype, or int8 (CPU; ring.py)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("middle_dtype", "middle_dir", "middle_unit", "kv_quantize"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise SettingsError(f.name, f"must be a whole number, got {value!r}")
            if not -1 < value <= MAX_TOKENS:
                raise SettingsError(f.name, f"must be between 0 and {MAX_TOKENS:,}, got {value:,}")
        for name in ("n_local", "limit_distance", "chunk_size", "middle_block"):
            if getattr(self, name) == 0:
                raise SettingsError(name, "must be a positive number of tokens, got 0")
        if self.n_local > self.limit_distance:
            raise SettingsError("n_local", f"({self.n_local:,}) must not exceed limit_distance "
                                f"({self.limit_distance:,}): distances beyond it were never trained")
        if self.middle_distance > self.limit_distance:
            raise SettingsError("middle_distance", f"must be between 0 and limit_distance ({self.limit_distance:,}), "
                                f"got {self.middle_distance:,}")
        if not isinstance(self.middle_dtype, str) or (self.middle_dtype != "auto"
                                                      and self.middle_dtype not in STORE_DTYPES):
            raise SettingsError("middle_dtype", f"must be auto, {', '.join(STORE_DTYPES)}; got {self.middle_dtype!r}")
        if self.kv_quantize not in KV_QUANTIZE:
            raise SettingsError("kv_quantize", f"must be {' or '.join(KV_QUANTIZE)}, got {self.kv_quantize!r}")
        if self.middle_unit not in MIDDLE_UNITS:
            raise SettingsError("middle_unit", f"must be {' or '.join(MIDDLE_UNITS)}, got {self.middle_unit!r}")
        per_block = 1 if self.middle_unit == "block" else self.middle_block
        if self.middle_blocks and self.middle_top_k > self.middle_blocks * per_block:
            # A bounded search reads middle_blocks blocks per KV head: it has no more to rank.
            raise SettingsError("middle_top_k", f"({self.middle_top_k:,}) must not exceed the "
                                f"{self.middle_blocks * per_block:,} {self.middle_unit}s one bounded search reads "
                                "(middle_blocks); raise middle_blocks, or 0 for an exact search")
        d = self.middle_dir
        if d is not None and not (isinstance(d, str) and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)):
            raise SettingsError("middle_dir", f"{d!r} is not a writable directory")

    # -- building ---------------------------------------------------------------
    @classmethod
    def for_model(cls, trained_length: int, *, retrieval: bool | None = False, n_global: int | None = None,
                  n_local: int | None = None, limit_distance: int | None = None, chunk_size: int | None = None,
                  middle_distance: int | None = None, middle_top_k: int | None = None,
                  **rest: Any) -> LambdaSettings:
        """Paper defaults for a model trained on L = trained_length tokens; None means "not given".

        n_local = limit_distance = L, n_global = 100.  `retrieval` turns on the measured
        retrieval recipe (docs/results.md): top-k 5 and a window and distance cap of L/2,
        where the model itself still reads reliably (with a full L window it already
        misses keys in plain view).  The middle insertion distance defaults to L/8:
        retrieved tokens read as close, recent text (at L/4 and beyond the embedded model
        stopped using them).  Explicit values override the recipe; `rest` are the other
        fields, as they are.
        """
        if retrieval:
            if limit_distance is None:  # the recipe's cap, or the window asked for when that is wider
                limit_distance = max(trained_length // 2, n_local or 0)
            middle_top_k = middle_top_k or RETRIEVAL_TOP_K
        limit = trained_length if limit_distance is None else limit_distance
        local = limit if n_local is None else n_local
        distance = min(trained_length // 8, limit) if middle_distance is None else middle_distance
        return cls(n_global=DEFAULT_N_GLOBAL if n_global is None else n_global, n_local=local,
                   limit_distance=limit, chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                   middle_top_k=middle_top_k or 0, middle_distance=distance,
                   **{k: v for k, v in rest.items() if v is not None})

    def replace(self, **changes: Any) -> LambdaSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- reading ----------------------------------------------------------------
    @property
    def retrieves(self) -> bool:
        """Whether the generated rows attend to middle tokens."""
        return self.middle_top_k > 0

    @property
    def ring_size(self) -> int:
        """Slots of the window ring: one chunk more than the window, so a chunk is stored before it is attended."""
        return self.n_local + self.chunk_size

    @property
    def layout(self) -> dict[str, object]:
        """The settings that decide what a cache holds (the rest only steer retrieval and can change)."""
        keep = self.middle_top_k > 0
        return {"n_global": self.n_global, "n_local": self.n_local, "limit_distance": self.limit_distance,
                "chunk_size": self.chunk_size, "kv_quantize": self.kv_quantize, "middle stores": keep,
                "middle_from_layer": self.middle_from_layer if keep else None,
                "middle_block": self.middle_block if keep else None}

    def store_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The middle store's precision for a model computing in `model_dtype`."""
        if self.middle_dtype == "auto":
            return torch.float16 if model_dtype == torch.float32 else model_dtype
        return STORE_DTYPES[self.middle_dtype]

    # -- serialised form --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field by name (reports, state headers)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LambdaSettings:
        """The inverse of to_dict, for untrusted input: unknown or missing fields are refused."""
        if not isinstance(data, dict):
            raise SettingsError("settings", f"must be an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SettingsError(unknown[0], "is not a setting")
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise SettingsError(missing[0], "is missing")
        return cls(**data)
