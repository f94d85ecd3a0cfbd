"""Would torch.compile pay for a CPU decode step?  Eager, static-buffer and compiled steps, timed.

Once the ring is full (past n_local + chunk tokens) every decode step has the same shapes, so the
engine's static-buffer path (`Engine(graphs="static")`, graphs.py: the step that CUDA graphs
replay) can be handed to `torch.compile` as it is: one callable `(ids, plan) -> logits`.  This
script encodes `--length` tokens of a text, then times median steps of
  1. the default eager step (window as ring spans, pieces),
  2. the static-buffer eager step (the whole ring under a 0/-inf mask),
  3. the same step compiled by inductor (first call timed apart: that is the compile),
each in its own engine and model load, one after the other.  Needs a quiet machine.

    python scripts/compile_step_experiment.py --text plays.txt --length 9k --dtype bfloat16 --quantize int4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.units import parse_length


def median_step_ms(engine: Engine, state, steps: int) -> float:
    for _ in range(3):
        engine.step(state, 5)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step(state, 5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--length", default="9k", help="tokens encoded first (past n_local + chunk for a static step)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    n = parse_length(a.length)
    with open(a.text, encoding="utf-8") as f:
        text = f.read(n * 8)
    ids = None
    for mode in ("off", "static", "compile"):
        lm = load_model(None, "cpu", a.dtype, quantize=a.quantize)
        engine = Engine(lm, graphs="off" if mode == "off" else "static")
        if ids is None:  # the same ids for every mode
            ids = torch.tensor(lm.tokenizer.encode(text)[:n])
        state = engine.encode(ids)
        if mode == "compile":
            engine.step(state, 5)  # makes the static step (key: one new token, last row's logits)
            graph = state.cache.graphs[(1, True)]
            graph.forward = torch.compile(graph.forward, dynamic=False)
            t0 = time.perf_counter()
            engine.step(state, 5)
            print(f"compile: first compiled step {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"{mode:8s} median step {median_step_ms(engine, state, a.steps):.1f} ms at {n:,} tokens "
              f"({a.dtype}, --quantize {a.quantize})", flush=True)
        del engine, state


if __name__ == "__main__":
    main()
