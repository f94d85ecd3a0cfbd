"""Encoded documents on disk (`.lminf`), and checkpoints to come back to after a detour.

A `.lminf` file is a safetensors file: per layer the ring and global K/V buffers of
the Λ cache (only the slots in use), the next-token logits, and a JSON header in
safetensors' metadata (model identity, attention settings, cache counters, the
document's hash and token count).  safetensors never unpickles; shapes and dtypes
are checked against the loaded model before anything is used, so a truncated or
foreign file is refused with one line.

`Checkpoint` lets a task append text to an encoded document (a question, a request
for notes), generate, and then put the cache back exactly as it was, by saving only
the ring slots the detour can overwrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .cache import LambdaCache, LambdaSettings
from .documents import STATE_SUFFIX, is_state_path, stat_source  # noqa: F401 - re-exported
from .errors import InputError
from .generate import Engine, GenerationMetrics, State
from .models import LoadedModel
from .outputs import publish

FORMAT = "lminf-state"
VERSION = 1
SUFFIX = STATE_SUFFIX
_BUFFERS = ("k_ring", "v_ring", "k_global", "v_global")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_fingerprint(lm: LoadedModel) -> str:
    """Identifies a model's weights, shapes and vocabulary, independent of device and dtype.

    Samples of the first, middle and last parameter are rounded to bfloat16 first, so
    the same weights loaded in float32 or bfloat16, on CPU or GPU, give one fingerprint.
    """
    cfg = lm.model.config
    h = hashlib.sha256()
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "intermediate_size")}
    h.update(json.dumps(shape, sort_keys=True).encode())
    h.update(str(len(lm.tokenizer)).encode())
    params = [p for _, p in lm.model.named_parameters()]
    for p in (params[0], params[len(params) // 2], params[-1]):
        sample = p.detach().reshape(-1)[:4096].float().cpu().to(torch.bfloat16)  # [<=4096]
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class StateHeader:
    """What a `.lminf` file says about itself (its JSON metadata)."""

    model_name: str
    model_spec: str
    model_fingerprint: str
    n_global: int
    n_local: int
    limit_distance: int
    length: int
    base: int
    rebases: int
    ring_size: int
    max_chunk: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str
    prompt_fingerprint: str
    document_name: str
    document_sha256: str
    document_tokens: int
    document_characters: int
    document_pages: int | None = None
    notes: list[str] = field(default_factory=list)
    tail: str = ""  # the document's last few tokens, not in the cache: re-tokenized with each prompt
    lminf_version: str = __version__
    # Retrieval settings; with middle_top_k > 0 the file also carries the middle stores.
    middle_top_k: int = 0
    middle_from_layer: int = 4
    middle_distance: int = 0
    middle_block: int = 64
    middle_blocks: int = 16
    middle_dtype: str = "auto"

    @property
    def settings(self) -> LambdaSettings:
        """The attention settings the state was encoded with."""
        return LambdaSettings(self.n_global, self.n_local, self.limit_distance, self.middle_top_k,
                              self.middle_from_layer, self.middle_distance, self.middle_block,
                              self.middle_blocks, self.middle_dtype)

    def to_json(self) -> str:
        """The header as one JSON object."""
        return json.dumps(asdict(self), ensure_ascii=False)


def build_header(engine: Engine, state: State, model_spec: str, prompt_fingerprint: str, document_name: str,
                 document_sha256: str, document_tokens: int, document_characters: int,
                 document_pages: int | None, notes: list[str] | None = None, tail: str = "") -> StateHeader:
    """The header describing `state`, as encoded by `engine`."""
    cache, s = state.cache, engine.settings
    return StateHeader(
        model_name=engine.lm.name, model_spec=model_spec, model_fingerprint=model_fingerprint(engine.lm),
        n_global=s.n_global, n_local=s.n_local, limit_distance=s.limit_distance,
        length=cache.length, base=cache.base, rebases=cache.rebases, ring_size=cache.ring_size,
        max_chunk=cache.max_chunk, n_layers=len(cache.layers), n_kv_heads=cache.n_kv_heads,
        head_dim=cache.head_dim, dtype=str(cache.dtype).removeprefix("torch."),
        prompt_fingerprint=prompt_fingerprint, document_name=document_name, document_sha256=document_sha256,
        document_tokens=document_tokens, document_characters=document_characters, document_pages=document_pages,
        notes=list(notes or []), tail=tail, middle_top_k=s.middle_top_k, middle_from_layer=s.middle_from_layer,
        middle_distance=s.middle_distance, middle_block=s.middle_block, middle_blocks=s.middle_blocks,
        middle_dtype=s.middle_dtype)


def _views(header: StateHeader) -> tuple[int, int]:
    """Ring and global slots in use: only those are written."""
    return min(header.length, header.ring_size), min(header.length, header.n_global)


def save_state(path: str | Path, state: State, header: StateHeader, overwrite: bool = True) -> int:
    """Write the cache and header to `path` atomically; returns the file size in bytes.

    With overwrite False an existing `path` is left alone (UsageError), even one that
    appears while the state is being written (outputs.publish).
    """
    from safetensors.torch import save_file

    if state.logits is None:
        raise InputError("nothing has been encoded: there is no state to save")
    ring_view, global_view = _views(header)
    tensors: dict[str, Tensor] = {"logits": state.logits.detach().reshape(-1).cpu().contiguous()}
    for i, layer in enumerate(state.cache.layers):
        for name in _BUFFERS:
            view = ring_view if "ring" in name else global_view
            tensors[f"layers.{i}.{name}"] = getattr(layer, name)[:, :, :view].cpu().contiguous()  # [1, Hkv, view, D]
        if layer.middle is not None:  # retrieval: the middle of the document travels with the state
            m = layer.middle
            for buf in ("k", "v"):
                tensors[f"layers.{i}.middle_{buf}"] = getattr(m, buf)[:, :m.length].cpu().contiguous()  # [Hkv, n, D]
                if m.quantized:  # int8: the per-token scales travel too
                    scale = getattr(m, f"{buf}_scale")[:, :m.length]
                    tensors[f"layers.{i}.middle_{buf}_scale"] = scale.cpu().contiguous()  # [Hkv, n]
    target = Path(path).expanduser()
    if target.is_dir():
        raise InputError(f"{path} is a directory; give a file name ending in {SUFFIX}")
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lminf-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION), "header": header.to_json()})
            publish(tmp, target, overwrite)  # with the umask's permissions (mkstemp gives 0600)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return target.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def read_header(path: str | Path) -> StateHeader:
    """Read and validate a state file's header without loading a model or tensors."""
    from safetensors import SafetensorError, safe_open

    name = str(path)
    p = Path(path).expanduser()
    stat_source(name, p)  # missing, a broken link or a symlink loop: one line saying which
    if p.is_dir():
        raise InputError(f"{name} is a directory, not a saved state")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise InputError(f"{name} is not a complete lminf state (truncated or damaged: {exc})") from exc
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if meta.get("format") != FORMAT:
        raise InputError(f"{name} is a safetensors file but not an lminf state")
    if meta.get("version") != str(VERSION):
        raise InputError(f"{name} is lminf state format v{meta.get('version')}; this lminf reads v{VERSION}")
    try:
        raw = json.loads(meta["header"])
        header = StateHeader(**raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{name} has a damaged lminf header") from exc
    if header.dtype not in _DTYPES:
        raise InputError(f"{name} has an unsupported dtype '{header.dtype}'")
    return header


def check_compatible(header: StateHeader, engine: Engine, prompt_fingerprint: str, name: str) -> None:
    """Refuse a state made by another model, other attention settings or other prompt wording."""
    fp = model_fingerprint(engine.lm)
    if header.model_fingerprint != fp:
        # The name comes from the file: the CLI shows it escaped (ui.printable), like every error.
        raise InputError(f"{name} was encoded by another model, '{str(header.model_name)[:200]}' (fingerprint "
                         f"{header.model_fingerprint}), not {engine.lm.name} ({fp}); "
                         "pass that model with --model (a state never chooses its model)")
    s, e = header.settings.layout, engine.settings.layout
    if s != e:
        diff = [k for k in s if s[k] != e[k]]
        raise InputError(f"{name} was encoded with " + ", ".join(f"{k}={s[k]}" for k in diff)
                         + "; these options ask for " + ", ".join(f"{k}={e[k]}" for k in diff))
    if header.prompt_fingerprint != prompt_fingerprint:
        raise InputError(f"{name} was encoded with another prompt layout (another lminf version or chat "
                         "template); encode the document again")


def load_state(path: str | Path, engine: Engine, header: StateHeader, prompt_fingerprint: str) -> State:
    """Rebuild the encoded state of `path` in a fresh cache of `engine` (checked first)."""
    from safetensors import SafetensorError, safe_open

    name = str(path)
    check_compatible(header, engine, prompt_fingerprint, name)
    cache = engine.new_cache()
    if (cache.ring_size, cache.max_chunk) != (header.ring_size, header.max_chunk):
        raise InputError(f"{name} needs --chunk-size {header.max_chunk} (its cache ring holds {header.ring_size} "
                         f"tokens; this one holds {cache.ring_size})")
    expected = (len(cache.layers), cache.n_kv_heads, cache.head_dim)
    if (header.n_layers, header.n_kv_heads, header.head_dim) != expected:
        raise InputError(f"{name} has cache shapes for another model")
    ring_view, global_view = _views(header)
    dtype = _DTYPES[header.dtype]
    try:
        with safe_open(str(Path(path).expanduser()), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            logits = _tensor(f, keys, "logits", None, dtype, name)
            vocab = engine.lm.model.get_output_embeddings().weight.shape[0]
            if logits.shape != (vocab,):
                raise InputError(f"{name} has logits of shape {tuple(logits.shape)}, expected ({vocab},)")
            for i, layer in enumerate(cache.layers):
                for buf in _BUFFERS:
                    view = ring_view if "ring" in buf else global_view
                    shape = (1, cache.n_kv_heads, view, cache.head_dim)
                    t = _tensor(f, keys, f"layers.{i}.{buf}", shape, dtype, name)
                    getattr(layer, buf)[:, :, :view] = t.to(device=cache.device, dtype=cache.dtype)
                if layer.middle is not None:
                    n_mid = max(0, header.length - header.n_local - header.n_global)
                    shape = (cache.n_kv_heads, n_mid, cache.head_dim)
                    # Any precision: a store written on a GPU (bfloat16) loads into a CPU one (float16),
                    # an int8 one (with its scales) into any other.
                    mk, mv = (_middle_tensor(f, keys, f"layers.{i}.middle_{buf}", shape, name) for buf in "kv")
                    layer.middle.append(mk, mv)
    except SafetensorError as exc:
        raise InputError(f"{name} is not a complete lminf state (truncated or damaged: {exc})") from exc
    cache.length, cache.base, cache.rebases = header.length, header.base, header.rebases
    cache.stored_upto = max(header.n_global, header.length - header.n_local)
    metrics = GenerationMetrics(cache_bytes=cache.nbytes)
    return State(cache, logits.to(device=engine.lm.device, dtype=engine.lm.dtype), metrics)


def _middle_tensor(f: Any, keys: set[str], key: str, shape: tuple[int, ...], name: str) -> Tensor:
    """A middle store's keys or values as saved: float as they are, int8 times their scales."""
    if f"{key}_scale" not in keys:
        return _tensor(f, keys, key, shape, None, name)
    scale = _tensor(f, keys, f"{key}_scale", shape[:2], torch.float32, name)
    return _tensor(f, keys, key, shape, torch.int8, name).float() * scale[..., None]


def _tensor(f: Any, keys: set[str], key: str, shape: tuple[int, ...] | None, dtype: torch.dtype | None,
            name: str) -> Tensor:
    if key not in keys:
        raise InputError(f"{name} is missing tensor '{key}' (truncated or damaged)")
    t = f.get_tensor(key)
    want = dtype if dtype is not None else (t.dtype if t.is_floating_point() else torch.float32)
    if t.dtype != want or (shape is not None and tuple(t.shape) != shape):
        raise InputError(f"{name}: tensor '{key}' is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
                         f"expected {str(want).removeprefix('torch.')} {shape}")
    return t


class Checkpoint:
    """A point in an encoded stream to return to after appending at most `budget` tokens.

    Only the ring slots those tokens can overwrite are copied (plus the global
    buffers while the stream is shorter than n_global).  If a re-base could happen
    within the budget the whole ring is copied instead, since a re-base rotates
    every stored key.  Restoring gives back bit-identical buffers and counters.
    """

    def __init__(self, state: State, budget: int) -> None:
        if budget <= 0:
            raise ValueError("a checkpoint needs a positive token budget")
        cache = state.cache
        self.state, self.budget = state, budget
        self.length, self.base, self.rebases = cache.length, cache.base, cache.rebases
        self.stored_upto = cache.stored_upto
        self.middle_lengths = [layer.middle.length if layer.middle is not None else 0 for layer in cache.layers]
        self.logits = None if state.logits is None else state.logits.clone()
        rebase_possible = cache.length + budget - cache.base > cache.rebase_every + cache.ring_size
        if rebase_possible or budget >= cache.ring_size:
            self.slots = None
        else:
            self.slots = torch.arange(cache.length, cache.length + budget, device=cache.device) % cache.ring_size
        keep_global = cache.length < cache.settings.n_global
        self.saved = []
        for layer in cache.layers:
            ring = (layer.k_ring, layer.v_ring) if self.slots is None else (layer.k_ring[:, :, self.slots],
                                                                           layer.v_ring[:, :, self.slots])
            ring = tuple(t.clone() for t in ring)
            glob = (layer.k_global.clone(), layer.v_global.clone()) if keep_global else None
            self.saved.append((ring, glob))

    def restore(self) -> None:
        """Put the cache and logits back as they were when the checkpoint was made."""
        cache = self.state.cache
        if cache.length - self.length > self.budget:
            raise RuntimeError(f"detour of {cache.length - self.length} tokens exceeds the checkpoint budget "
                               f"{self.budget}")
        if self.slots is not None and cache.rebases != self.rebases:
            # Cannot happen when the budget was respected (see __init__); a full copy undoes re-bases.
            raise RuntimeError("the cache was re-based inside a partial checkpoint")
        for layer, (ring, glob) in zip(cache.layers, self.saved, strict=True):
            if self.slots is None:
                layer.k_ring.copy_(ring[0])
                layer.v_ring.copy_(ring[1])
            else:
                layer.k_ring[:, :, self.slots] = ring[0]
                layer.v_ring[:, :, self.slots] = ring[1]
            if glob is not None:
                layer.k_global.copy_(glob[0])
                layer.v_global.copy_(glob[1])
        for layer, n in zip(cache.layers, self.middle_lengths, strict=True):
            if layer.middle is not None:
                layer.middle.truncate(n)  # forget the detour's tokens (appended only, never rewritten)
        cache.length, cache.base, cache.rebases = self.length, self.base, self.rebases
        cache.stored_upto = self.stored_upto
        self.state.logits = None if self.logits is None else self.logits.clone()


def new_empty_state(engine: Engine) -> State:
    """A state with an empty cache (nothing encoded yet)."""
    cache: LambdaCache = engine.new_cache()
    return State(cache, None, GenerationMetrics(cache_bytes=cache.nbytes))
