"""Decode time per token with each sampler, paired in one process on one encoded state.

    PYTHONPATH=. python scripts/sampler_timing.py [--tokens 64] [--rounds 3] [--text FILE]

Encodes some text once (the embedded model unless --model), then, round after round,
generates --tokens tokens from the same snapshot under each sampler in turn and prints
the median step time of each (the step: sampling + one forward + the token's read-back)
and the sampler's own median time on those logits.  "before" is the hand-written
sampler lminf had until the transformers processors replaced it (kept here only as the
reference of this measurement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lminf_cli.generate import Engine  # noqa: E402
from lminf_cli.models import load_model  # noqa: E402
from lminf_cli.sampling import CONTINUE_DEFAULTS, SamplingParams, make_sampler  # noqa: E402


def before_sampler(temperature: float, top_p: float, seed: int):
    """The sampler lminf had before (temperature and top-p in plain torch)."""
    if temperature == 0:
        return lambda logits: int(torch.argmax(logits))
    g = torch.Generator().manual_seed(seed)

    def sample(logits):
        scores = logits.float() / temperature
        if top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, -1)
            drop = probs.cumsum(-1) - probs > top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=g))

    return sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=None, help="text to encode first [default: docs/design.md]")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    engine = Engine(lm)
    default_text = Path(__file__).resolve().parents[1] / "docs" / "design.md"
    text = Path(args.text or default_text).read_text()
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[: args.prompt_tokens]
    state = engine.encode(ids)
    snap = state.snapshot(args.tokens + 1)
    samplers = {
        "before: greedy (argmax)": lambda: before_sampler(0.0, 1.0, 0),
        "after: greedy": lambda: make_sampler(SamplingParams(), lm.device, state.recent_ids),
        "before: temperature 0.8, top-p 0.95": lambda: before_sampler(0.8, 0.95, 1),
        "after: temperature 0.8, top-p 0.95": lambda: make_sampler(
            SamplingParams(temperature=0.8, top_p=0.95, seed=1), lm.device, state.recent_ids),
        "after: continue defaults (+ min-p 0.05, penalty 1.1/64)": lambda: make_sampler(
            CONTINUE_DEFAULTS.replace(seed=1), lm.device, state.recent_ids),
    }
    steps: dict[str, list[float]] = {k: [] for k in samplers}
    alone: dict[str, list[float]] = {k: [] for k in samplers}
    for _ in range(args.rounds):
        for name, build in samplers.items():
            state.restore(snap)
            sampler = build()
            for _ in range(args.tokens):
                t0 = time.perf_counter()
                logits = state.logits
                token = sampler(logits)
                t1 = time.perf_counter()
                engine.step(state, token)
                t2 = time.perf_counter()
                alone[name].append(t1 - t0)
                steps[name].append(t2 - t0)
    print(f"{lm.name}, {len(ids)} prompt tokens, {args.tokens} tokens x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':58s} {'step ms':>8s} {'sampler ms':>11s}")
    for name in samplers:
        print(f"{name:58s} {1e3 * statistics.median(steps[name]):8.2f} {1e3 * statistics.median(alone[name]):11.3f}")


if __name__ == "__main__":
    main()
