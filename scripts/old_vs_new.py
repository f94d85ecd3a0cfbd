"""Two versions of lminf side by side in one process: decode latency paired, encode throughput alternated.

A refactor must not slow the engine down.  The older version is imported from a copy of
its package under another name (e.g. `git archive <commit> lminf_cli | tar -x -C DIR`
then `mv DIR/lminf_cli DIR/lminf_old`); each version loads its own copy of the model
and encodes the same tokens with the same settings; decode steps alternate between
them in rounds (which goes first alternates too), so a busy machine slows both alike.

    PYTHONPATH=.:/tmp/oldpkg python scripts/old_vs_new.py --text plays.txt --old lminf_old --length 9k \
        --encode-length 32k [--dtype bfloat16 --quantize int4 --kv-quantize int8]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import parse_length


def old_engine(package: str, dtype: str, quantize: str, kv_quantize: str):
    """The older version's engine over its own load of the embedded model (its API: Engine(lm), and
    Engine(lm, settings) for a window other than the default)."""
    models = importlib.import_module(f"{package}.models")
    generate = importlib.import_module(f"{package}.generate")
    extra = {} if quantize == "none" else {"quantize": quantize}  # versions before --quantize: none only
    lm = models.load_model(None, "cpu", dtype, **extra)
    if kv_quantize == "none":  # versions before --kv-quantize: the default window only
        return generate.Engine(lm)
    settings = importlib.import_module(f"{package}.settings")
    return generate.Engine(lm, settings.LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=kv_quantize))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--old", required=True, help="the older package's import name")
    ap.add_argument("--length", default="9k", help="stream length before the decode steps")
    ap.add_argument("--encode-length", default=None, help="also time an encode of this many tokens, twice each")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default="none", help="none, int8 or int4 (both versions)")
    ap.add_argument("--kv-quantize", default="none", help="the window: none or int8 (both versions)")
    a = ap.parse_args()
    lm = load_model(None, "cpu", a.dtype, quantize=a.quantize)
    new = Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=a.kv_quantize))
    old = old_engine(a.old, a.dtype, a.quantize, a.kv_quantize)
    n = parse_length(a.length)
    n_enc = parse_length(a.encode_length) if a.encode_length else 0
    with open(a.text, encoding="utf-8") as f:
        ids = torch.tensor(new.lm.tokenizer.encode(f.read(max(n, n_enc) * 8))[:max(n, n_enc)])
    arms = [("old", old, old.encode(ids[:n])), ("new", new, new.encode(ids[:n]))]
    for _, engine, state in arms:  # warm-up
        for _ in range(3):
            engine.step(state, 5)
    medians: list[list[float]] = [[], []]
    for r in range(a.rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            _, engine, state = arms[i]
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                engine.step(state, 5)
                times.append(time.perf_counter() - t0)
            medians[i].append(statistics.median(times))
    for (label, _, _), ms in zip(arms, medians, strict=True):
        print(f"decode {label}: per-round median ms " + " ".join(f"{m * 1e3:.1f}" for m in ms)
              + f"; median {statistics.median(ms) * 1e3:.1f}")
    print(f"decode paired ratio new / old: {statistics.median(b / c for c, b in zip(*medians, strict=True)):.3f}")
    if n_enc:
        times: dict[str, list[float]] = {"old": [], "new": []}
        for label, engine, _ in [arms[0], arms[1], arms[1], arms[0]]:  # ABBA
            t0 = time.perf_counter()
            engine.encode(ids[:n_enc])
            times[label].append(time.perf_counter() - t0)
        for label, ts in times.items():
            print(f"encode {label}: {n_enc:,} tokens in " + ", ".join(f"{t:.1f}" for t in ts)
                  + f" s; {n_enc / statistics.mean(ts):.0f} tok/s")


if __name__ == "__main__":
    main()
