"""Passkey accuracy under several top-k retrieval settings, one encode per prompt.

Retrieval touches only the rows being generated, so everything before the last
prefill chunk is the same under every setting (and under Λ-attention alone).
Each prompt is therefore encoded once up to its last chunk, with the middle-token
stores filling and retrieval off; then, for each setting, the last chunk is
encoded and the answer decoded greedily, and the cache is restored from a
checkpoint.  tests/test_retrieval.py checks that this equals a fresh
`lminf eval passkey --middle-top-k K ...` run for every setting.

    PYTHONPATH=. python scripts/retrieval_sweep.py --lengths 8k,16k,32k \\
        --configs off,5@4:4096,16@4:4096,64@4:4096,5@2:4096,5@8:4096,5@4:1024,5@4:8192 --out out/sweep.jsonl

A setting is K@L0:D[/B]: K middle tokens per head, from layer L0, scored at
insertion distance D, searching B blocks per head (0: exact search; default:
the engine's) ("off": Λ-attention alone).  Results go to a JSON-lines file; a
Markdown table (accuracy per length and setting) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from lminf_cli.eval import passkey as ev
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.sampling import SamplingParams
from lminf_cli.settings import LambdaSettings
from lminf_cli.units import format_length, parse_lengths


def parse_config(text: str) -> tuple[int, int, int, int | None]:
    """'off' -> (0, 0, 0, None); 'K@L0:D' -> (K, L0, D, None); 'K@L0:D/B' -> (K, L0, D, B)."""
    if text == "off":
        return 0, 0, 0, None
    k, rest = text.split("@")
    layer, dist = rest.split(":")
    dist, _, blocks = dist.partition("/")
    return int(k), int(layer), int(dist), int(blocks) if blocks else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-sample", type=int, default=0, help="sample index to start from (extend a grid)")
    ap.add_argument("--configs", default="off,5@4:4096")
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-local", type=int, default=None, help="window [default: the trained length]")
    ap.add_argument("--limit-distance", type=int, default=None, help="distance cap [default: the trained length]")
    ap.add_argument("--n-global", type=int, default=None)
    ap.add_argument("--middle-dtype", default="auto", help="store precision (auto: float16 for a float32 model)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    configs = [(c, *parse_config(c)) for c in a.configs.split(",")]
    lm = load_model(a.model, "auto", "auto")
    tok = lm.tokenizer
    on = [c for c in configs if c[1]]
    settings = LambdaSettings.for_model(lm.adapter.trained_length, n_local=a.n_local,
                                        limit_distance=a.limit_distance, n_global=a.n_global,
                                        middle_top_k=max((c[1] for c in on), default=0),
                                        middle_from_layer=min((c[2] for c in on), default=4),
                                        middle_dtype=a.middle_dtype)
    engine = Engine(lm, settings)
    chunk = engine.chunk_size
    rows = []
    with a.out.open("a") as out:
        for n in parse_lengths(a.lengths, "--lengths"):
            for d in ev.parse_depths(a.depths):
                for sample in range(a.first_sample, a.first_sample + a.samples):
                    key = ev.passkey_key(a.seed, n, d, sample)
                    p = ev.passkey_prompt(tok, n, d, key, "plain")
                    cut = (len(p.ids) - 1) // chunk * chunk  # where the one-shot encode's last chunk starts
                    t0 = time.perf_counter()
                    state = engine.encode(p.ids[:cut], continued=False)
                    prefix_s = time.perf_counter() - t0
                    mark = state.snapshot(len(p.ids) - cut + ev.PASSKEY_NEW_TOKENS + 1)
                    for name, k, layer, dist, blocks in configs:
                        state.cache.set_retrieval(k, layer or None, dist or None, blocks)
                        steps_before = len(state.metrics.step_seconds)
                        t1 = time.perf_counter()
                        engine.encode(p.ids[cut:], state=state)
                        new = engine.generate_ids(state, ev.PASSKEY_NEW_TOKENS, SamplingParams())
                        answer = ev.read_answer(new, tok)
                        steps = state.metrics.step_seconds[steps_before:]
                        row = {"config": name, "n_local": settings.n_local, "limit": settings.limit_distance,
                               "n_global": settings.n_global, "blocks": state.cache.settings.middle_blocks,
                               "store_dtype": settings.middle_dtype, "length": n, "tokens": len(p.ids),
                               "depth": d, "sample": sample,
                               "key": key, "answer": answer, "correct": ev.first_integer(answer) == key,
                               "prefix_seconds": round(prefix_s, 2), "seconds": round(time.perf_counter() - t1, 2),
                               "median_step_ms": round(statistics.median(steps) * 1000, 1) if steps else None,
                               "middle_store_bytes": state.cache.middle_nbytes}
                        state.restore(mark)
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        rows.append(row)
                        print(f"{format_length(n):>5} depth {d:.1f} {name:>12}: {'ok ' if row['correct'] else 'no '}"
                              f"{answer.strip()[:30]!r}", flush=True)
    lengths = sorted({r["length"] for r in rows})
    print("\n| setting | " + " | ".join(format_length(n) for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, *_ in configs:
        cells = []
        for n in lengths:
            mine = [r for r in rows if r["config"] == name and r["length"] == n]
            cells.append(f"{sum(r['correct'] for r in mine)}/{len(mine)}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
