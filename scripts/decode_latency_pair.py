"""Decode latency at two stream lengths, measured in one process, interleaved.

On a noisy machine two bench runs minutes apart can differ by more than length
does; alternating rounds of steps between two encoded states in one process
compares them under the same conditions.  The longer state only needs a full
ring (n_local + chunk tokens) to cost what any longer stream costs: past that,
a decode step touches the same number of keys at any length.

    PYTHONPATH=. python scripts/decode_latency_pair.py --text plays.txt --lengths 8k,16k
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.units import parse_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="text file to encode")
    ap.add_argument("--lengths", default="8k,16k", help="two stream lengths")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    args = ap.parse_args()
    lengths = parse_lengths(args.lengths)
    if len(lengths) != 2 or lengths[0] >= lengths[1]:
        ap.error("--lengths takes two lengths, the shorter first")
    short, long_ = lengths
    lm = load_model()
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(lm.tokenizer.encode(f.read(long_ * 8))[:long_])
    engine = Engine(lm)
    states = {short: engine.encode(ids[:short]), long_: engine.encode(ids)}
    medians: dict[int, list[float]] = {short: [], long_: []}
    for r in range(args.rounds):
        order = (short, long_) if r % 2 == 0 else (long_, short)  # alternate who goes first
        for n in order:
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engine.step(states[n], 5)
                times.append(time.perf_counter() - t0)
            medians[n].append(statistics.median(times))
    for n, ms in medians.items():
        print(f"{n:>7} tokens: per-round median ms " + " ".join(f"{m * 1e3:.0f}" for m in ms)
              + f"; median {statistics.median(ms) * 1e3:.1f}")
    ratio = statistics.median(b / a for a, b in zip(medians[short], medians[long_], strict=True))
    print(f"paired ratio {long_}/{short}: {ratio:.3f}")


if __name__ == "__main__":
    main()
