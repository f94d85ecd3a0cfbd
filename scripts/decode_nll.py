"""Mean NLL through decode steps, teacher-forced, for several precisions on the same tokens.

`lminf eval ppl` scores prefill chunks, which multiply by the dense weights; `--quantize` only
changes decode steps (a few rows multiply by the packed copies).  This script measures the
decode path itself: it encodes `--context` tokens of a text, then feeds the next `--steps`
tokens one decode step at a time and scores each step's prediction of the token that follows.
Every precision gets the same tokens; the first one listed is the reference for the argmax
agreement.  One model is loaded at a time.

    python scripts/decode_nll.py --text plays.txt --context 32k --steps 256 \
        --configs float32:none,bfloat16:none,bfloat16:int8,bfloat16:int4,bfloat16:int4:int8 --json

A config is dtype:quantize[:kv_quantize] (the third part: the window's keys and values, none or int8).
"""

from __future__ import annotations

import argparse
import gc
import json
import math

import torch

from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import parse_length


def decode_scores(engine: Engine, ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL [steps] of ids[context + 1:] from decode steps after encoding ids[:context], and each step's argmax."""
    state = engine.encode(ids[:context])
    nll, top = [], []
    with torch.inference_mode():
        for t in range(context, len(ids) - 1):
            logits = engine.step(state, int(ids[t])).float().reshape(-1)  # [V]: the prediction of ids[t + 1]
            nll.append(float(torch.logsumexp(logits, 0) - logits[int(ids[t + 1])]))
            top.append(int(logits.argmax()))
    return torch.tensor(nll, dtype=torch.float64), torch.tensor(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", default="32k", help="tokens encoded before the scored decode steps")
    ap.add_argument("--steps", type=int, default=256, help="decode steps scored")
    ap.add_argument("--configs", default="float32:none,bfloat16:none,bfloat16:int8,bfloat16:int4",
                    help="dtype:quantize[:kv_quantize] triples, the first is the reference")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    context = parse_length(a.context)
    configs = [(*c.split(":"), "none")[:3] for c in a.configs.split(",")]
    with open(a.text, encoding="utf-8") as f:
        text = f.read((context + a.steps + 1) * 8)
    rows, ids, ref_nll, ref_top = [], None, None, None
    for dtype, quantize, kv in configs:
        lm = load_model(None, "cpu", dtype, quantize=quantize)
        if ids is None:  # the first model's tokenizer: the same ids for every precision
            ids = torch.tensor(lm.tokenizer.encode(text)[:context + a.steps + 1])
            if len(ids) < context + a.steps + 1:
                raise SystemExit(f"{a.text}: only {len(ids)} tokens, need {context + a.steps + 1}")
        settings = LambdaSettings.for_model(lm.adapter.trained_length, kv_quantize=kv)
        nll, top = decode_scores(Engine(lm, settings), ids, context)
        del lm
        gc.collect()  # one model in memory at a time
        if ref_nll is None:
            ref_nll, ref_top = nll, top
        row = {"dtype": dtype, "quantize": quantize, "kv_quantize": kv, "context": context, "steps": len(nll),
               "mean_nll": round(float(nll.mean()), 5), "delta_nats": round(float((nll - ref_nll).mean()), 5),
               "argmax_equal": int((top == ref_top).sum()), "ppl": round(math.exp(float(nll.mean())), 3)}
        rows.append(row)
        if not a.json:
            print(f"{dtype}+{quantize} kv {kv}: mean NLL {row['mean_nll']:.5f} ({row['delta_nats']:+.5f} nats against "
                  f"{'+'.join(configs[0])}), argmax equal in {row['argmax_equal']}/{row['steps']} steps",
                  flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
