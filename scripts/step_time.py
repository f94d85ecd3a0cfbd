"""Median decode step of one lminf checkout, one model in the process: for comparing two versions
run after one another, alternately (two models in one process, as scripts/old_vs_new.py does,
share caches and allocator and moved a 9k step by several percent either way in one session).

    for i in 1 2 3; do
        PYTHONPATH=/path/to/old/checkout python scripts/step_time.py --text plays.txt --length 9k
        python scripts/step_time.py --text plays.txt --length 9k
    done

Uses only the API every version since the int8 window has (load_model, Engine, LambdaSettings).
For the scripted step against the layer-by-layer path of one checkout, alternate
`LMINF_SCRIPTED_STEP=off python scripts/step_time.py ...` with the plain command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lminf_cli
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import parse_length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--length", default="9k")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--kv-quantize", default="int8")
    a = ap.parse_args()
    lm = load_model(None, "cpu", a.dtype, quantize=a.quantize)
    engine = Engine(lm, LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=a.kv_quantize))
    n = parse_length(a.length)
    with open(a.text, encoding="utf-8") as f:
        ids = torch.tensor(lm.tokenizer.encode(f.read(n * 8))[:n])
    with torch.inference_mode():
        state = engine.encode(ids)
        for _ in range(5):  # warm-up
            engine.step(state, 5)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            engine.step(state, 5)
            times.append(time.perf_counter() - t0)
    print(f"{lminf_cli.__file__}: median step {statistics.median(times) * 1e3:.2f} ms at {n:,} tokens "
          f"({a.dtype}, --quantize {a.quantize}, --kv-quantize {a.kv_quantize})")


if __name__ == "__main__":
    main()
