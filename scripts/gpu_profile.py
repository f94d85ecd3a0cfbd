"""Where the time goes on a GPU: encode per chunk size, decode eager vs graphed, attention kernels.

Run on a CUDA machine (random weights, nothing downloaded):
    python scripts/gpu_profile.py --arch llama-2-7b --length 32k --chunks 256,1024
Prints one table of timings and the top CUDA kernels of a few decode steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lminf_cli import attention
from lminf_cli.bench import arch_config
from lminf_cli.generate import Engine, sync
from lminf_cli.memory import PeakMemory
from lminf_cli.models import from_hf
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import parse_length


def build(arch: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(arch_config(arch), dtype=dtype)
    return from_hf(model, None, arch, torch.device(device), dtype)


def time_decode(engine: Engine, state, steps: int, graphs: bool) -> list[float]:
    """Per-token seconds of `steps` greedy steps (argmax syncs each one)."""
    engine.graphs = "auto" if graphs else "off"
    token = int(torch.argmax(state.logits))
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = int(torch.argmax(engine.step(state, token)))
        out.append(time.perf_counter() - t0)
    return out


def memory_probe(lm, settings, ids, chunk: int) -> None:
    """Per layer of the last chunk: memory allocated on entering attention and the peak inside it."""
    from lminf_cli import cache as cache_mod

    log: list[tuple[int, int]] = []
    original = cache_mod.LayerCache.attend

    def attend(self, q, k, v, plan):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = original(self, q, k, v, plan)
        log.append((before, torch.cuda.max_memory_allocated() - before))
        return out

    cache_mod.LayerCache.attend = attend
    try:
        Engine(lm, settings.replace(chunk_size=chunk)).encode(ids)
    finally:
        cache_mod.LayerCache.attend = original
    last = log[-lm.adapter.n_layers:]
    print(f"memory probe, chunk {chunk}: entry MiB per layer of the last chunk "
          f"{[round(b / 2**20) for b, _ in last[:4]]} ... {[round(b / 2**20) for b, _ in last[-2:]]}; "
          f"peak inside attend MiB max {max(p for _, p in log) / 2**20:.0f}")


def measure(lm, settings, ids, chunk: int, graphs: bool, decode: int):
    """Encode all ids then decode `decode` tokens; returns the engine, the state and a table row."""
    engine = Engine(lm, settings.replace(chunk_size=chunk), graphs="auto" if graphs else "off")
    warm = engine.encode(ids[: 2 * chunk])
    del warm
    sync(lm.device)
    mem = PeakMemory(lm.device)
    mem.reset()
    t0 = time.perf_counter()
    state = engine.encode(ids)
    sync(lm.device)
    enc = time.perf_counter() - t0
    peak = mem.read() - lm.weight_bytes
    kv = state.cache.nbytes
    time_decode(engine, state, 4, graphs)  # warm-up (and capture)
    ms = statistics.median(time_decode(engine, state, decode, graphs)) * 1000
    bw = (lm.weight_bytes + kv) / (ms / 1000) / 1e12
    return engine, state, (chunk, graphs, enc, len(ids) / enc, ms, bw, kv / 2**30, peak / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--length", default="32k")
    ap.add_argument("--chunks", default="256,1024")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--memprobe", action="store_true")
    ap.add_argument("--fused-decode", action="store_true", help="decode attention through the fused kernel")
    a = ap.parse_args()
    n = parse_length(a.length)
    if a.fused_decode:
        attention.CUDA_EAGER_MAX_ROWS = 0
    cuda = a.device.startswith("cuda")
    lm = build(a.arch, torch.bfloat16 if cuda else torch.float32, a.device)
    ids = torch.randint(0, lm.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    settings = LambdaSettings.for_model(lm.adapter.trained_length)
    weights = lm.weight_bytes
    rows: list[tuple] = []
    if a.memprobe:
        with torch.inference_mode():
            for chunk in (int(c) for c in a.chunks.split(",")):
                memory_probe(lm, settings, ids[:8192], chunk)
    with torch.inference_mode():
        for chunk in (int(c) for c in a.chunks.split(",")):
            for graphs in (True, False):  # the eager engine stays for the profiles below
                engine, state, row = measure(lm, settings, ids, chunk, graphs, a.decode)
                rows.append(row)
                if graphs:  # freed before the next run, whose peak must not include it
                    del engine, state
            if a.profile and chunk == int(a.chunks.split(",")[0]):
                from torch.profiler import ProfilerActivity, profile

                engine.graphs = "off"
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    time_decode(engine, state, 3, False)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
                kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
                print(f"CUDA kernels per decode step: {kernels / 3:.0f}")
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    engine.encode(ids[: 2 * chunk], state=state)
                    sync(lm.device)
                print(f"encode of 2 chunks of {chunk} after {n} tokens:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
            if a.profile:
                cache = engine.new_cache()
                sync(lm.device)
                t0 = time.perf_counter()
                for s in range(0, n, chunk):
                    cache.commit(cache.plan(min(chunk, n - s)))
                sync(lm.device)
                print(f"planning alone, chunk {chunk}: {time.perf_counter() - t0:.3f} s for {n} tokens")
                del cache
            del state, engine
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{a.arch} {lm.dtype}, {n} tokens, weights {weights / 2**30:.2f} GiB, {where}")
    print("chunk graphs encode_s enc_tok/s decode_ms TB/s kv_GiB peak_beyond_weights_GiB")
    for r in rows:
        print(f"{r[0]:5d} {r[1]!s:6} {r[2]:8.2f} {r[3]:9.0f} {r[4]:9.2f} {r[5]:5.2f} {r[6]:6.2f} {r[7]:7.2f}")


if __name__ == "__main__":
    main()
