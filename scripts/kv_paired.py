"""The window in the cache's dtype against the int8 window, paired in one process on the same model.

One model load; two engines over it, `kv_quantize="none"` and `"int8"`, each encodes the same
tokens, then their decode steps alternate in rounds (which goes first alternates too), so a
busy or drifting machine slows both alike and the ratio holds even when the absolute figures
move.  Encode is timed alternately too (twice each) when --encode-length is given.

    python scripts/kv_paired.py --text plays.txt --lengths 2k,9k,32k --encode-length 16k \
        --dtype bfloat16 --quantize int4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import parse_length

KINDS = ("none", "int8")


def paired_steps(engines: list[Engine], ids: torch.Tensor, rounds: int, steps: int) -> list[float]:
    """Median ms per decode step of each engine after encoding `ids`, measured in alternating rounds."""
    states = [e.encode(ids) for e in engines]
    for e, s in zip(engines, states, strict=True):  # warm-up
        for _ in range(3):
            e.step(s, 5)
    medians: list[list[float]] = [[] for _ in engines]
    for r in range(rounds):
        for i in (range(len(engines)) if r % 2 == 0 else reversed(range(len(engines)))):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                engines[i].step(states[i], 5)
                times.append(time.perf_counter() - t0)
            medians[i].append(statistics.median(times))
    return [statistics.median(m) * 1e3 for m in medians]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--lengths", default="2k,9k,32k", help="stream lengths before the decode steps")
    ap.add_argument("--encode-length", default=None, help="also time encoding this many tokens, twice each")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    lm = load_model(None, "cpu", a.dtype, quantize=a.quantize)
    engines = [Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=k)) for k in KINDS]
    lengths = [parse_length(x) for x in a.lengths.split(",")]
    n_enc = parse_length(a.encode_length) if a.encode_length else 0
    with open(a.text, encoding="utf-8") as f:
        ids = torch.tensor(lm.tokenizer.encode(f.read(max(*lengths, n_enc) * 8))[:max(*lengths, n_enc)])
    rows = []
    with torch.inference_mode():
        for n in lengths:
            ms = paired_steps(engines, ids[:n], a.rounds, a.steps)
            rows.append({"length": n, **{f"step_ms_{k}": round(m, 2) for k, m in zip(KINDS, ms, strict=True)},
                         "ratio": round(ms[1] / ms[0], 3)})
            if not a.json:
                print(f"{n:>7,} tokens: step {ms[0]:.2f} ms (none) / {ms[1]:.2f} ms (int8) = {ms[1] / ms[0]:.3f}x",
                      flush=True)
        if n_enc:
            secs: list[list[float]] = [[], []]
            for r in range(4):
                i = (0, 1, 1, 0)[r]
                t0 = time.perf_counter()
                engines[i].encode(ids[:n_enc])
                secs[i].append(time.perf_counter() - t0)
            tps = [n_enc / min(s) for s in secs]
            by_kind = {f"encode_tps_{k}": round(t) for k, t in zip(KINDS, tps, strict=True)}
            rows.append({"encode_length": n_enc, **by_kind, "ratio": round(tps[1] / tps[0], 3)})
            if not a.json:
                print(f"encode {n_enc:,}: {tps[0]:,.0f} tok/s (none) / {tps[1]:,.0f} tok/s (int8) = "
                      f"{tps[1] / tps[0]:.3f}x", flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
