"""Encoded documents on disk (`.lminf`): the file format, its header and the compatibility checks.

A `.lminf` file is a safetensors file: the cache's `state_dict()` (per layer the ring and
global K/V slots in use, and the middle stores when retrieval is on), the next-token
logits, and a JSON header in safetensors' metadata (model identity, the engine's
LambdaSettings, the cache's counters, the document's hash and token count).  safetensors
never unpickles.  A state file is untrusted input: the header is size-capped and checked
field by field (type and range) before anything else reads it, the counters are checked
against each other by the cache, and every tensor's shape and dtype against the loaded
model before it is used, so a truncated, foreign or tampered file is refused with one line.
What the cache holds, and how it is put back, is the cache's business (LambdaCache.state_dict /
load_state_dict); this module only writes and reads the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import __version__
from .documents import STATE_SUFFIX, stat_source
from .errors import InputError, SettingsError
from .generate import Engine, GenerationMetrics, State
from .outputs import publish
from .settings import MAX_TOKENS, LambdaSettings

FORMAT = "lminf-state"
IDS = "stream_ids"  # the encoded stream's token ids, [length] int32 (optional)
VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The JSON header is read whole before it is checked: notes and a tail are a few KB, so this is generous.
MAX_HEADER_BYTES = 4 << 20
# Field kinds a header may hold; read_header checks each value against its field's kind.
_STR, _INT, _OPT_INT, _STRS = "a string", "a whole number", "a whole number or null", "a list of strings"


@dataclass
class StateHeader:
    """What a `.lminf` file says about itself (its JSON metadata)."""

    model_name: str
    model_spec: str            # how the encoding model was named; informative only, never loaded from
    model_fingerprint: str
    settings: LambdaSettings
    cache: dict[str, int]      # LambdaCache.meta_state(): length, base, rebases
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

    @property
    def length(self) -> int:
        """Tokens in the encoded stream."""
        return self.cache["length"]

    def to_dict(self) -> dict[str, Any]:
        """The header as plain data (the settings nested; a local --middle-dir is not part of a state)."""
        out = asdict(self)
        out["settings"] = self.settings.replace(middle_dir=None).to_dict()
        del out["settings"]["middle_dir"]
        return out

    def to_json(self) -> str:
        """The header as one JSON object."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, raw: Any, name: str) -> StateHeader:
        """A header from untrusted JSON data: every field checked for its type and range."""
        if not isinstance(raw, dict):
            raise InputError(f"{name} has a damaged lminf header (not a JSON object)")
        kinds = _FIELD_KINDS
        unknown = sorted(set(raw) - set(kinds))
        if unknown:
            raise InputError(f"{name}: unknown header field '{unknown[0]}'")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise InputError(f"{name}: header field '{f.name}' is missing")
                continue
            values[f.name] = _checked_field(name, f.name, raw[f.name], kinds[f.name])
        try:
            values["settings"] = LambdaSettings.from_dict(raw["settings"])
        except SettingsError as exc:
            raise InputError(f"{name}: header setting {exc}") from None
        header = cls(**values)
        if header.document_tokens > header.length:
            raise InputError(f"{name}: header says {header.document_tokens:,} document tokens in a stream of "
                             f"{header.length:,}")
        if header.dtype not in DTYPES:
            raise InputError(f"{name} has an unsupported dtype '{header.dtype}'")
        return header


_FIELD_KINDS: dict[str, Any] = {
    "model_name": _STR, "model_spec": _STR, "model_fingerprint": _STR, "settings": "settings",
    "cache": "counters", "n_layers": _INT, "n_kv_heads": _INT, "head_dim": _INT, "dtype": _STR,
    "prompt_fingerprint": _STR, "document_name": _STR, "document_sha256": _STR, "document_tokens": _INT,
    "document_characters": _INT, "document_pages": _OPT_INT, "notes": _STRS, "tail": _STR, "lminf_version": _STR,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_field(name: str, key: str, value: Any, kind: str) -> Any:
    """value if it is of its field's kind and range, else an InputError naming the field."""
    if kind == "settings":
        return value  # LambdaSettings.from_dict checks it
    if kind == "counters":
        if not isinstance(value, dict) or set(value) != {"length", "base", "rebases"}:
            raise InputError(f"{name}: header field 'cache' must hold exactly length, base and rebases")
        for k, v in value.items():
            if not _is_int(v) or not 0 <= v <= MAX_TOKENS:
                raise InputError(f"{name}: cache counter '{k}' must be a whole number from 0 to {MAX_TOKENS:,}, "
                                 f"got {_short(v)}")
        return dict(value)
    ok = {_STR: isinstance(value, str),
          _INT: _is_int(value) and 0 <= value <= MAX_TOKENS,
          _OPT_INT: value is None or (_is_int(value) and 0 <= value <= MAX_TOKENS),
          _STRS: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        raise InputError(f"{name}: header field '{key}' must be {kind}"
                         f"{f' from 0 to {MAX_TOKENS:,}' if kind in (_INT, _OPT_INT) else ''}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def build_header(engine: Engine, state: State, model_spec: str, prompt_fingerprint: str, document_name: str,
                 document_sha256: str, document_tokens: int, document_characters: int,
                 document_pages: int | None, notes: list[str] | None = None, tail: str = "") -> StateHeader:
    """The header describing `state`, as encoded by `engine`."""
    cache = state.cache
    return StateHeader(
        model_name=engine.lm.name, model_spec=model_spec, model_fingerprint=engine.lm.fingerprint,
        settings=cache.settings, cache=cache.meta_state(), n_layers=len(cache.layers), n_kv_heads=cache.n_kv_heads,
        head_dim=cache.head_dim, dtype=str(cache.dtype).removeprefix("torch."),
        prompt_fingerprint=prompt_fingerprint, document_name=document_name, document_sha256=document_sha256,
        document_tokens=document_tokens, document_characters=document_characters, document_pages=document_pages,
        notes=list(notes or []), tail=tail)


def save_state(path: str | Path, state: State, header: StateHeader, ids: Tensor | None = None,
               overwrite: bool = True) -> int:
    """Write the cache, header and (when given) the stream's token ids to `path` atomically; returns the
    file size in bytes.  The ids (4 bytes a token) let passages of the document be read again.

    With overwrite False an existing `path` is left alone (UsageError), even one that
    appears while the state is being written (outputs.publish).
    """
    if state.logits is None:
        raise InputError("nothing has been encoded: there is no state to save")
    tensors: dict[str, Tensor] = {"logits": state.logits.detach().reshape(-1).cpu().contiguous()}
    tensors.update(state.cache.state_dict())
    if ids is not None:
        tensors[IDS] = ids.to(torch.int32).reshape(-1).cpu().contiguous()
    target = Path(path).expanduser()
    if target.is_dir():
        raise InputError(f"{path} is a directory; give a file name ending in {STATE_SUFFIX}")
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
        raise InputError(f"{name} is lminf state format v{_short(meta.get('version'))}; this lminf reads "
                         f"v{VERSION}: encode the document again")
    text = meta.get("header")
    if not isinstance(text, str) or len(text) > MAX_HEADER_BYTES:
        raise InputError(f"{name} has a damaged lminf header (missing, or over {MAX_HEADER_BYTES >> 20} MiB)")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands of levels deep
        raise InputError(f"{name} has a damaged lminf header ({type(exc).__name__})") from None
    return StateHeader.from_dict(raw, name)


def check_compatible(header: StateHeader, engine: Engine, prompt_fingerprint: str, name: str) -> None:
    """Refuse a state made by another model, other attention settings or other prompt wording."""
    fp = engine.lm.fingerprint
    if header.model_fingerprint != fp:
        # Names come from the file: the CLI shows them escaped (output.printable), like every error.
        raise InputError(f"{name} was encoded by another model, '{header.model_name[:200]}' (given as "
                         f"'{header.model_spec[:200]}', fingerprint {header.model_fingerprint}), not {engine.lm.name} "
                         f"({fp}); pass that model with --model (a state never chooses its model)")
    s, e = header.settings.layout, engine.settings.layout
    if s != e:
        diff = [k for k in s if s[k] != e[k]]
        raise InputError(f"{name} was encoded with " + ", ".join(f"{k}={s[k]}" for k in diff)
                         + "; these options ask for " + ", ".join(f"{k}={e[k]}" for k in diff))
    if header.prompt_fingerprint != prompt_fingerprint:
        raise InputError(f"{name} was encoded with another prompt layout (another lminf version or chat "
                         "template); encode the document again")
    cache = (header.n_layers, header.n_kv_heads, header.head_dim)
    adapter = engine.adapter
    if cache != (adapter.n_layers, adapter.n_kv_heads, adapter.head_dim):
        raise InputError(f"{name} has cache shapes for another model")


class _Tensors(Mapping):
    """The tensors of an open safetensors file, read one at a time when asked for (no second copy of them all)."""

    def __init__(self, f: Any, name: str, dtype: torch.dtype, exclude: tuple[str, ...] = ()) -> None:
        self.f, self.name, self.dtype = f, name, dtype
        self.names = set(f.keys()) - set(exclude)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.names:
            raise KeyError(key)
        t = self.f.get_tensor(key)
        # Ring, global and logits tensors are in the state's dtype; middle stores keep their own precision,
        # and an int8 ring its own (the cache checks those: ring.Int8Ring.load_state_dict).
        own = "middle_" in key or key.endswith("_ring_scale") or (t.dtype == torch.int8 and key.endswith("_ring"))
        if not own and t.dtype != self.dtype:
            raise InputError(f"tensor '{key}' is {str(t.dtype).removeprefix('torch.')}, expected "
                             f"{str(self.dtype).removeprefix('torch.')}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def load_state(path: str | Path, engine: Engine, header: StateHeader, prompt_fingerprint: str) -> State:
    """Rebuild the encoded state of `path` in a fresh cache of `engine` (checked first)."""
    name = str(path)
    check_compatible(header, engine, prompt_fingerprint, name)
    try:
        cache = engine.new_cache()
        cache.check_meta_state(header.cache)
        with safe_open(str(Path(path).expanduser()), framework="pt", device="cpu") as f:
            dtype = DTYPES[header.dtype]
            if "logits" not in set(f.keys()):
                raise InputError("tensor 'logits' is missing (truncated or damaged)")
            logits = _Tensors(f, name, dtype)["logits"]
            vocab = engine.lm.model.get_output_embeddings().weight.shape[0]
            if logits.shape != (vocab,):
                raise InputError(f"logits have shape {tuple(logits.shape)}, expected ({vocab},)")
            cache.load_state_dict(_Tensors(f, name, dtype, exclude=("logits", IDS)), header.cache)
    except SafetensorError as exc:
        raise InputError(f"{name} is not a complete lminf state (truncated or damaged: {exc})") from exc
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    metrics = GenerationMetrics(cache_bytes=cache.nbytes)
    return State(cache, logits.to(device=engine.lm.device, dtype=engine.lm.dtype), metrics)


def read_stream_ids(path: str | Path, header: StateHeader, vocab: int) -> Tensor | None:
    """The stream's token ids saved with a state ([length] int32, checked), or None when it has none."""
    name = str(path)
    try:
        with safe_open(str(Path(path).expanduser()), framework="pt", device="cpu") as f:
            if IDS not in set(f.keys()):
                return None
            ids = f.get_tensor(IDS)
    except SafetensorError as exc:
        raise InputError(f"{name} is not a complete lminf state (truncated or damaged: {exc})") from exc
    if ids.dtype != torch.int32 or tuple(ids.shape) != (header.length,):
        raise InputError(f"{name}: tensor '{IDS}' is {ids.dtype} {tuple(ids.shape)}, expected int32 ({header.length},)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"{name}: tensor '{IDS}' holds token ids outside the vocabulary")
    return ids
