"""Checks on a --model path before transformers sees it: what kind of thing it is, and whether it is safe.

A model folder or GGUF file is untrusted input like any document: lminf never runs
code from it and never unpickles it.  transformers would prompt for (or refuse with
a page of text) a folder that needs its own Python code, load pickled
`pytorch_model.bin` weights, follow a PEFT adapter to another model, and fail on a
truncated GGUF with a struct.error; these checks turn each case into one line saying
what is wrong, before anything is loaded.  Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Any

from .errors import ModelError

GGUF_MAGIC = b"GGUF"
CONFIG_LIMIT = 16 << 20  # config.json larger than this is not a model config
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Weights stored with pickle (torch.save): loading them can run code, so lminf never does.
# Sizes a config.json may give: far above any real model (Llama 3 405B: 126 layers, hidden
# 16,384; Gemma: 256k vocabulary), far below what would make transformers build millions
# of modules or allocate terabytes before it ever looks at the weights.
CONFIG_LIMITS = {"num_hidden_layers": 1_000, "n_layer": 1_000, "num_layers": 1_000, "hidden_size": 131_072,
                 "n_embd": 131_072, "d_model": 131_072, "intermediate_size": 1_048_576, "vocab_size": 10_000_000,
                 "num_attention_heads": 4_096, "num_key_value_heads": 4_096, "n_head": 4_096,
                 "max_position_embeddings": 1 << 24}
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "model.pth",
                   "model.ckpt", "tf_model.h5", "flax_model.msgpack")


def model_path_kind(spec: str) -> tuple[str, Path]:
    """'gguf', 'dir' or 'hub' for a --model value, refusing paths that are none of them.

    A file counts as GGUF by its magic bytes, not its name, so `--model notes.txt`
    says that it is not a model instead of "not found", and a renamed GGUF still loads.
    """
    path = Path(spec).expanduser()
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelError(f"--model {spec}: too many levels of symbolic links (a symlink loop)") from None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise ModelError(f"--model {spec}: {exc.strerror or exc}") from None
        if path.suffix.lower() == ".gguf":
            raise ModelError(f"model file not found: {spec}") from None
        if os.path.islink(path):
            raise ModelError(f"--model {spec} is a broken symbolic link (it points to {os.readlink(path)})") from None
        if spec.startswith((".", "/", "~")):
            raise ModelError(f"model not found: {spec} (expected a model directory or a .gguf file)") from None
        return "hub", path
    if stat.S_ISDIR(st.st_mode):
        return "dir", path
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"--model {spec} is not a regular file or directory (a device, pipe or socket)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {spec}: {exc.strerror or exc}") from None
    if magic == GGUF_MAGIC:
        return "gguf", path
    if path.suffix.lower() == ".gguf":
        raise ModelError(f"{spec} is not a GGUF file (it does not start with the GGUF magic bytes)")
    raise ModelError(f"{spec} is a file but not a model: --model takes a model directory (with config.json), "
                     "a .gguf file or the id of a model in the local Hugging Face cache")


def check_model_dir(path: Path, spec: str) -> None:
    """Refuse a folder that needs custom code, has only pickled weights or is a PEFT adapter."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"'{spec}' is a directory without config.json: not a Hugging Face model")
    config = _read_json(config_path, spec)
    for section in (config, config.get("text_config")):
        for key, limit in CONFIG_LIMITS.items():
            value = section.get(key) if isinstance(section, dict) else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit):
                raise ModelError(f"'{spec}': config.json has {key} = {str(value)[:40]}, not a size a model can "
                                 f"have (1 to {limit:,})")
    model_type = config.get("model_type")
    if "auto_map" in config and not _builtin_model_type(model_type):
        raise ModelError(f"'{spec}' needs its own Python code to load (config.json has auto_map and model_type "
                         f"'{model_type}' is not built into transformers); lminf never runs code from a model folder")
    if (path / "adapter_config.json").exists():
        raise ModelError(f"'{spec}' holds a PEFT adapter (adapter_config.json); lminf loads complete models only")
    explicit = config.get("transformers_weights")
    if explicit is not None and not (isinstance(explicit, str) and explicit.endswith(SAFE_WEIGHTS)):
        raise ModelError(f"'{spec}': config.json names weights that are not safetensors "
                         f"(transformers_weights: {explicit!r}); lminf loads only safetensors weights")
    if any((path / name).is_file() for name in SAFE_WEIGHTS) or isinstance(explicit, str):
        return
    pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
    if pickled:
        raise ModelError(f"'{spec}' has only pickled weights ({pickled[0]}), which can run code when loaded; "
                         "lminf loads only safetensors weights (model.safetensors): convert them with a trusted tool")
    raise ModelError(f"'{spec}' has no model weights (model.safetensors)")


def _read_json(path: Path, spec: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > CONFIG_LIMIT:
            raise ModelError(f"'{spec}': config.json is over {CONFIG_LIMIT >> 20} MiB, not a model config")
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise ModelError(f"'{spec}': config.json is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"'{spec}': config.json is not a JSON object")
    return config


def _builtin_model_type(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


# -- GGUF ---------------------------------------------------------------------------

# GGUF value types: fixed-size scalars by struct format, then string (8) and array (9).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4   # arrays of arrays: deeper than any real file
_MAX_DIMS = 8      # ggml tensors have at most 4


class _Damaged(Exception):
    """The header does not describe a complete file; the message says where."""


class _Header:
    """Bounds-checked reads over the mapped file."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Damaged("the header runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + min(n, 256)])  # keys are short; values are skipped

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY or depth >= _MAX_NESTING:
            raise _Damaged(f"unknown value type {kind}" if kind != _ARRAY else "arrays nested too deeply")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in _SCALARS:
            self.take(count * struct.calcsize(_SCALARS[item]))  # skipped: only their extent matters
            return None
        if count > self.size - self.pos:  # every element takes at least one byte
            raise _Damaged("an array is longer than the file")
        for _ in range(count):
            self.value(item, depth + 1)
        return None


def check_gguf(path: Path, spec: str) -> None:
    """Walk a GGUF header: counts, strings and arrays within the file, every tensor's data inside it.

    Reading it costs a fraction of a second even for large vocabularies (the file is
    mapped, not read), and spares transformers' reader a file it would crash on.
    """
    from gguf.constants import GGML_QUANT_SIZES

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelError(f"{spec} is a truncated GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                h = _Header(buf)
                h.take(4)
                version, n_tensors, n_kv = h.unpack("<I"), h.unpack("<Q"), h.unpack("<Q")
                if version not in (2, 3):
                    raise ModelError(f"{spec} is GGUF version {version}; lminf reads versions 2 and 3")
                if n_kv * 12 > size or n_tensors * 24 > size:  # smallest possible entries
                    raise _Damaged(f"it claims {n_kv:,} keys and {n_tensors:,} tensors, more than its "
                                   f"{size:,} bytes can hold")
                alignment = 32
                for _ in range(n_kv):
                    key, kind = h.string(), h.unpack("<I")
                    value = h.value(kind)
                    if key == b"general.alignment":
                        alignment = value
                if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                    raise _Damaged(f"general.alignment {alignment!r} is not a power of two")
                tensors = []
                for _ in range(n_tensors):
                    name, n_dims = h.string(), h.unpack("<I")
                    if n_dims > _MAX_DIMS:
                        raise _Damaged(f"tensor {name[:40]!r} has {n_dims} dimensions")
                    dims = [h.unpack("<Q") for _ in range(n_dims)]
                    kind, offset = h.unpack("<I"), h.unpack("<Q")
                    tensors.append((name, dims, kind, offset))
                data = -(-h.pos // alignment) * alignment
                for name, dims, kind, offset in tensors:
                    _check_tensor(name, dims, kind, offset, data, size, GGML_QUANT_SIZES)
    except _Damaged as exc:
        raise ModelError(f"{spec} is a truncated or damaged GGUF file: {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty or special file
        raise ModelError(f"cannot read model file {spec}: {getattr(exc, 'strerror', None) or exc}") from None


def _check_tensor(name: bytes, dims: list[int], kind: int, offset: int, data: int, size: int,
                  sizes: dict[Any, tuple[int, int]]) -> None:
    shown = name[:40].decode("utf-8", "replace")
    try:
        block, type_size = sizes[kind]
    except (KeyError, ValueError):
        raise _Damaged(f"tensor '{shown}' has unknown type {kind}") from None
    elements = 1
    for d in dims:
        elements *= d
    if elements % block:
        raise _Damaged(f"tensor '{shown}' does not fill whole blocks of its type")
    if data + offset + elements // block * type_size > size:
        raise _Damaged(f"tensor '{shown}' ends past the end of the file")
