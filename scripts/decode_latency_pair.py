"""Decode latency at two stream lengths, measured in one process, interleaved.

On a noisy machine two bench runs minutes apart can differ by more than length
does; alternating rounds of steps between two encoded states in one process
compares them under the same conditions.  The longer state only needs a full
ring (n_local + chunk tokens) to cost what any longer stream costs: past that,
a decode step touches the same number of keys at any length.

    PYTHONPATH=. python scripts/decode_latency_pair.py --text plays.txt --lengths 8k,16k

With --kernel-ab the two arms are one state at the first length, stepped with the
CPU few-row projection kernel (kernels.py) switched off and on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lminf_cli import kernels
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.units import parse_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="text file to encode")
    ap.add_argument("--lengths", default="8k,16k", help="two stream lengths")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--kernel-ab", action="store_true",
                    help="compare F.linear with the few-row kernel at the first length instead")
    args = ap.parse_args()
    lengths = parse_lengths(args.lengths)
    if len(lengths) != 2 or lengths[0] >= lengths[1]:
        ap.error("--lengths takes two lengths, the shorter first")
    short, long_ = lengths
    lm = load_model()
    n_text = short if args.kernel_ab else long_
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(lm.tokenizer.encode(f.read(n_text * 8))[:n_text])
    engine = Engine(lm)
    on = kernels.FEW_ROWS_MAX
    if args.kernel_ab:
        state = engine.encode(ids)
        arms = [("F.linear", state, 0), ("few-row kernel", state, on)]  # (label, state, FEW_ROWS_MAX)
    else:
        arms = [(f"{short} tokens", engine.encode(ids[:short]), on), (f"{long_} tokens", engine.encode(ids), on)]
    medians: list[list[float]] = [[], []]
    for r in range(args.rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate who goes first
            _, state, kernels.FEW_ROWS_MAX = arms[i]
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engine.step(state, 5)
                times.append(time.perf_counter() - t0)
            medians[i].append(statistics.median(times))
    for (label, _, _), ms in zip(arms, medians, strict=True):
        print(f"{label:>15}: per-round median ms " + " ".join(f"{m * 1e3:.0f}" for m in ms)
              + f"; median {statistics.median(ms) * 1e3:.1f}")
    ratio = statistics.median(b / a for a, b in zip(*medians, strict=True))
    print(f"paired ratio {arms[1][0]} / {arms[0][0]}: {ratio:.3f}")


if __name__ == "__main__":
    main()
