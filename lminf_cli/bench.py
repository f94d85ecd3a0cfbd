"""Side-by-side benchmark: the unmodified model vs the LM-Infinite engine.

Each (variant, length) runs in its own child process (`python -m lminf_cli.bench SPEC`),
so one run's peak memory cannot pollute the next and a run that is killed for
memory or time leaves the others intact.  Timers start after a warm-up and read
only after a device sync.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import native
from .corpus import all_plays_text, plays_dir
from .errors import UsageError
from .generate import Engine, sync
from .memory import PeakMemory
from .models import from_hf, load_model, past_keyword, past_of, pick_device, pick_dtype
from .settings import LambdaSettings

# Shapes of well-known models, for speed and memory at their real scale without
# their weights.  Parameter counts are checked against the published ones in tests.
ARCHS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                       sliding_window=4096, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
PUBLISHED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
                    "smollm2-135m": 134_515_008}
# Peak DRAM bandwidth (bytes/s) of GPUs we know, matched by name.
GPU_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
                 ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 864e9), ("L4", 300e9),
                 ("A10G", 600e9), ("RTX 4090", 1008e9), ("RTX 3090", 936e9), ("V100", 900e9), ("T4", 320e9)]
VARIANTS = ("baseline", "baseline-same", "lminf")
# --baseline-dtype: "auto" runs the baseline at the reference precision (float32 on the CPU, so that
# lminf's bfloat16 or quantized speed is not hidden in the ratio; bfloat16 on GPU, as the unmodified
# model usually runs there) and, when lminf's precision differs, once more at lminf's ("baseline-same");
# "same" runs only the latter; a dtype runs only a baseline in that dtype.
BASELINE_DTYPES = ("auto", "same", "float32", "bfloat16", "float16")


def arch_config(arch: str):
    """An HF config for a named architecture."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise UsageError(f"unknown --arch '{arch}'; known: {', '.join(ARCHS)}")
    kw = dict(ARCHS[arch])
    model_type = kw.pop("model_type")
    theta = kw.pop("rope_theta")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    cfg.rope_theta = theta  # older transformers read this attribute
    return cfg


def count_parameters(arch: str) -> int:
    """Parameters of a named architecture, counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch_config(arch))
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass
class BenchSpec:
    """What one child process runs."""

    variant: str
    length: int
    decode_tokens: int = 64
    model: str | None = None
    arch: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    device_map: str | None = None  # --device-map, --max-memory, --load-in as given (see models.load_model)
    max_memory: str | None = None
    load_in: str | None = None
    text: str | None = None
    # The settings asked for (LambdaSettings.for_model's keywords; None = the default).
    requested: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class RunResult:
    """Measurements of one (variant, length) run; status says whether they exist."""

    variant: str
    length: int
    status: str = "ok"             # ok | oom | timeout | error
    message: str = ""
    device: str = ""
    model: str = ""
    precision: str = ""            # dtype, with "+int4"/"+int8" when quantized
    encode_seconds: float | None = None
    encode_tps: float | None = None
    decode_tps: float | None = None
    median_step_ms: float | None = None
    peak_memory_bytes: int | None = None
    peak_beyond_weights_bytes: int | None = None
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    bandwidth_bytes_per_s: float | None = None
    bandwidth_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- child side

def _load(spec: BenchSpec):
    if spec.arch:
        from transformers import AutoModelForCausalLM

        dev = pick_device(spec.device)
        dt = pick_dtype(spec.dtype, dev)
        torch.manual_seed(spec.seed)
        cfg = arch_config(spec.arch)
        if spec.device_map:
            from accelerate import dispatch_model, infer_auto_device_map

            # Built in host memory, then spread over the devices by accelerate.
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
            model = dispatch_model(model, device_map=infer_auto_device_map(model, dtype=dt))
        else:
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
        return from_hf(model, None, f"{spec.arch} (random weights)", None if spec.device_map else dev, dt,
                       quantize=spec.quantize)
    return load_model(spec.model, spec.device, spec.dtype, device_map=spec.device_map, max_memory=spec.max_memory,
                      load_in=spec.load_in, quantize=spec.quantize)


def precision_label(dtype: torch.dtype | str, quantize: str = "none") -> str:
    """'float32', 'bfloat16+int4' ...: the precision a run computed in."""
    name = str(dtype).removeprefix("torch.")
    return name if quantize in ("none", "", None) else f"{name}+{quantize}"


def bench_tokens(spec: BenchSpec, tokenizer, vocab_size: int) -> torch.Tensor:
    """`length` input tokens: from --text, else Shakespeare when installed, else seeded random ids."""
    text = None
    if spec.text:
        # Only what `length` tokens need (~4 characters each, twice over): tokenizing a whole
        # book would leave its memory in the process and count in the peak measured below.
        with open(spec.text, encoding="utf-8", errors="replace") as f:
            text = f.read(spec.length * 8)
    elif tokenizer is not None and plays_dir() is not None:
        text = all_plays_text()[: spec.length * 6]  # ~4 chars per token, with margin
    if text is not None and tokenizer is not None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise UsageError("--text has no tokens")
        reps = -(-spec.length // len(ids))
        return torch.tensor((ids * reps)[: spec.length], dtype=torch.long)
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, vocab_size, (spec.length,), generator=g)


def _bandwidth(result: RunResult, device: torch.device, bytes_per_token: int) -> None:
    if not result.median_step_ms:
        return
    result.bandwidth_bytes_per_s = bytes_per_token / (result.median_step_ms / 1000)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BANDWIDTH:
            if key.lower() in name.lower():
                result.bandwidth_fraction = result.bandwidth_bytes_per_s / peak
                break


def run_one(spec: BenchSpec) -> RunResult:
    """Load, warm up, then time encode + decode of one variant in this process."""

    lm = _load(spec)
    dev = lm.device
    result = RunResult(spec.variant, spec.length, device=str(dev), model=lm.name,
                       precision=precision_label(lm.dtype, lm.quantize))
    vocab = lm.model.config.vocab_size
    ids = bench_tokens(spec, lm.tokenizer, vocab).to(dev)
    weights = lm.weight_bytes
    mem = PeakMemory(dev)
    steps: list[float] = []
    with torch.inference_mode():
        if spec.variant == "lminf":
            settings = LambdaSettings.for_model(lm.adapter.trained_length, **spec.requested)
            engine = Engine(lm, settings)
            if settings.kv_quantize != "none":
                result.precision += f" kv:{settings.kv_quantize}"
            warm = engine.encode(ids[: min(len(ids), 2 * engine.chunk_size)])
            for _ in range(3):
                engine.step(warm, 1)
            del warm
            mem.reset()
            sync(dev)
            t0 = time.perf_counter()
            state = engine.encode(ids)
            sync(dev)
            result.encode_seconds = time.perf_counter() - t0
            token = int(torch.argmax(state.logits))
            for _ in range(spec.decode_tokens):
                t1 = time.perf_counter()
                token = int(torch.argmax(engine.step(state, token)))  # argmax syncs the device
                steps.append(time.perf_counter() - t1)
            result.kv_cache_bytes = state.cache.nbytes
            result.extra = {"settings": engine.settings.to_dict(), "middle_store_bytes": state.cache.middle_nbytes,
                            "decode_attention": native.status() if dev.type == "cpu" else None}
        else:
            model = lm.model
            past_kw = past_keyword(model)  # looked up once: the decode loop below is timed
            warm = model(ids[None, :64], use_cache=True, logits_to_keep=1)
            model(ids[None, 64:65], use_cache=True, **{past_kw: past_of(warm)})
            del warm
            mem.reset()
            sync(dev)
            t0 = time.perf_counter()
            out = model(ids[None], use_cache=True, logits_to_keep=1)
            sync(dev)
            result.encode_seconds = time.perf_counter() - t0
            past = past_of(out)
            token = int(torch.argmax(out.logits[0, -1]))
            for _ in range(spec.decode_tokens):
                t1 = time.perf_counter()
                out = model(torch.tensor([[token]], device=dev), use_cache=True, **{past_kw: past})
                past = past_of(out)
                token = int(torch.argmax(out.logits[0, -1]))
                steps.append(time.perf_counter() - t1)
            result.kv_cache_bytes = _dynamic_cache_bytes(past)
    result.encode_tps = spec.length / result.encode_seconds
    if steps:
        result.decode_tps = len(steps) / sum(steps)
        result.median_step_ms = sorted(steps)[len(steps) // 2] * 1000
    result.peak_memory_bytes = mem.read()
    result.weight_bytes = weights
    # CUDA counts allocations only; RSS also holds the runtime itself. Either way the
    # weights are the part both variants share.
    result.peak_beyond_weights_bytes = result.peak_memory_bytes - weights
    _bandwidth(result, dev, lm.decode_weight_bytes + (result.kv_cache_bytes or 0))
    return result


def _dynamic_cache_bytes(past) -> int:
    total = 0
    for layer in getattr(past, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- parent side

def classify_failure(returncode: int, stderr: str) -> tuple[str, str]:
    """A failed child's status ('oom' or 'error') and a one-line reason."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else ""
    if returncode in (-signal.SIGKILL, 137) or "out of memory" in text.lower() or "MemoryError" in text:
        return "oom", "out of memory" + (f" ({last[:120]})" if last and "memory" in last.lower() else "")
    return "error", last[:200] or f"exit code {returncode}"


Runner = Callable[[BenchSpec, float | None], RunResult]


def run_in_child(spec: BenchSpec, timeout: float | None) -> RunResult:
    """Run one spec in a fresh Python process; timeouts and crashes become statuses."""
    cmd = [sys.executable, "-m", "lminf_cli.bench", json.dumps(dataclasses.asdict(spec))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return RunResult(spec.variant, spec.length, status="timeout", message=f"over {timeout:.0f} s")
    if proc.returncode == 0 and proc.stdout.strip():
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return RunResult(**data)
    status, message = classify_failure(proc.returncode, proc.stderr)
    return RunResult(spec.variant, spec.length, status=status, message=message)


def variant_specs(base: BenchSpec, baseline: bool = True, baseline_dtype: str = "auto") -> list[BenchSpec]:
    """The child specs of one length: the baseline(s) (see BASELINE_DTYPES), then lminf.

    Every precision is resolved here, in the parent ("auto" -> this machine's choice), so that
    all children of a run compute in the precisions reported, whatever each would pick alone.
    """
    if baseline_dtype not in BASELINE_DTYPES:
        raise UsageError(f"unknown --baseline-dtype '{baseline_dtype}' (use {', '.join(BASELINE_DTYPES)})")
    dev = pick_device(base.device)
    lminf_dt = str(pick_dtype(base.dtype, dev)).removeprefix("torch.")
    if base.quantize not in ("none", "") and (dev.type != "cpu" or base.device_map):
        raise UsageError(f"--quantize {base.quantize} runs on the CPU only (PyTorch's weight-only CPU kernels): "
                         "use --device cpu, or --quantize none")
    if (base.requested or {}).get("kv_quantize") == "int8" and dev.type != "cpu":
        raise UsageError("--kv-quantize int8 runs on the CPU only (PyTorch's int8 CPU kernel): use --device cpu, "
                         "or --kv-quantize none")
    lminf = dataclasses.replace(base, variant="lminf", dtype=lminf_dt)
    same = dataclasses.replace(lminf, variant="baseline-same")
    specs = []
    if baseline:
        if baseline_dtype == "same":
            specs.append(dataclasses.replace(same, variant="baseline"))
        else:
            ref = baseline_dtype if baseline_dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
            specs.append(dataclasses.replace(lminf, variant="baseline", dtype=ref, quantize="none"))
            if baseline_dtype == "auto" and (lminf_dt, base.quantize) != (ref, "none"):
                specs.append(same)
    return [*specs, lminf]


def run_bench(base: BenchSpec, lengths: list[int], baseline: bool = True, baseline_timeout: float | None = None,
              runner: Runner = run_in_child, on_start: Callable[[str, int], None] | None = None,
              baseline_dtype: str = "auto") -> list[RunResult]:
    """Every length, the unmodified model first (unless skipped; at one or two precisions), then lminf."""
    results = []
    specs = variant_specs(base, baseline, baseline_dtype)
    for length in lengths:
        for s in specs:
            spec = dataclasses.replace(s, length=length)
            if on_start is not None:
                on_start(spec.variant, length)
            results.append(runner(spec, None if spec.variant == "lminf" else baseline_timeout))
    return results


def ratios(results: list[RunResult], against: str = "baseline") -> dict[int, dict[str, float | None]]:
    """Per length: encode speedup, decode speedup and memory saving of lminf over the baseline
    (`against`: "baseline-same" for the one at lminf's precision)."""
    out: dict[int, dict[str, float | None]] = {}
    by_key = {(r.variant, r.length): r for r in results}
    for length in dict.fromkeys(r.length for r in results):
        b, m = by_key.get((against, length)), by_key.get(("lminf", length))
        if not b or not m or b.status != "ok" or m.status != "ok":
            continue

        def div(x, y):
            return x / y if x and y else None

        out[length] = {
            "encode_speedup": div(b.encode_seconds, m.encode_seconds),
            "decode_speedup": div(m.decode_tps, b.decode_tps),
            "memory_saving": div(b.peak_memory_bytes, m.peak_memory_bytes),
            "memory_saving_beyond_weights": div(b.peak_beyond_weights_bytes, m.peak_beyond_weights_bytes),
        }
    return out


def _child_main(argv: list[str]) -> int:
    spec = BenchSpec(**json.loads(argv[0]))
    result = run_one(spec)
    sys.stdout.write(json.dumps(dataclasses.asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
