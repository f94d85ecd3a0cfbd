"""Decode steps through fused quantized projections (q/k/v, gate/up) against the separate layers,
paired in one process on the same model and state.

One model load, one engine; after encoding, rounds of decode steps alternate between the adapter's
fused projections and none (`adapter.fused` emptied: every layer runs its own kernel call), the
order alternating too, so a drifting machine slows both alike.  Each round restores the same
snapshot, so both read the same window.  Needs a quiet machine.

    python scripts/fused_paired.py --text plays.txt --lengths 2k,9k --dtype bfloat16 --quantize int4 \
        --kv-quantize int8
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--lengths", default="2k,9k")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--kv-quantize", default="int8")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    lm = load_model(None, "cpu", a.dtype, quantize=a.quantize)
    fused = dict(lm.adapter.fused)
    if not fused:
        raise SystemExit("this model has no fused projections (--quantize none?)")
    engine = Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=a.kv_quantize))
    lengths = [parse_length(x) for x in a.lengths.split(",")]
    with open(a.text, encoding="utf-8") as f:
        ids = torch.tensor(lm.tokenizer.encode(f.read(max(lengths) * 8))[:max(lengths)])
    variants = {"fused": fused, "separate": {}}
    rows = []
    with torch.inference_mode():
        for n in lengths:
            state = engine.encode(ids[:n])
            snap = state.snapshot(a.steps + 8)
            medians: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(a.rounds + 1):
                for name in (variants if r % 2 == 0 else reversed(variants)):
                    lm.adapter.fused = variants[name]
                    state.restore(snap)
                    times = []
                    for _ in range(a.steps):
                        t0 = time.perf_counter()
                        engine.step(state, 5)
                        times.append(time.perf_counter() - t0)
                    if r:  # round 0 warms both up
                        medians[name].append(statistics.median(times))
            ms = {k: statistics.median(v) * 1e3 for k, v in medians.items()}
            rows.append({"length": n, **{f"step_ms_{k}": round(v, 2) for k, v in ms.items()},
                         "ratio": round(ms["fused"] / ms["separate"], 3)})
            if not a.json:
                print(f"{n:>7,} tokens: step {ms['fused']:.2f} ms (fused) / {ms['separate']:.2f} ms (separate) = "
                      f"{ms['fused'] / ms['separate']:.3f}x", flush=True)
    lm.adapter.fused = fused
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
