"""Needles in real text, one encode per document, several ways of asking: which retrieval recipe works?

For each length and depth a fact is planted (lminf_cli.eval.needle), the document is
encoded once with middle-token stores, and each config asks the question from the same
state (snapshots keep it intact): retrieval off (Λ alone), token top-k, block top-k,
each with or without re-reading the passage the model's retrieval points at.  Every
row records the answer, whether it is a hit, and whether the located passage holds the
fact (how often the model's own retrieval looks in the right place).  JSON lines out.

    PYTHONPATH=. python scripts/needle_sweep.py --text kjv.txt --lengths 16k,32k --n-local 8192 \
        --configs off,tok5,blk4,tok5+r512,blk4+r512 --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from lminf_cli.documents import Document, read_document
from lminf_cli.eval.needle import DEFAULT_NEEDLES, plant
from lminf_cli.eval.passkey import parse_depths
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.tasks import ask, encode_document, locate, locate_words
from lminf_cli.units import parse_lengths

CONFIG = re.compile(r"^(off|tok(\d+)|blk(\d+))(?:@(\d+))?(?:\+([rw])(\d+))?$")


def parse_config(c: str) -> tuple[str, int, int | None, int, str]:
    """'off', 'tok5', 'blk4', optional '@L' first layer, optional '+rN' (re-read the N tokens the model's
    retrieval points at) or '+wN' (the N tokens the question's words point at)
    -> (unit, k, layer, reread, reread_by)."""
    m = CONFIG.match(c)
    if not m:
        raise SystemExit(f"bad config {c!r}: off | tokK | blkK, then @LAYER, then +rSPAN or +wSPAN")
    unit = "token" if m.group(2) else "block" if m.group(3) else "off"
    k = int(m.group(2) or m.group(3) or 0)
    by = "attention" if m.group(5) == "r" else "words"
    return unit, k, int(m.group(4)) if m.group(4) else None, int(m.group(6) or 0), by


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--lengths", default="16k")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--configs", default="off,tok5,blk4")
    ap.add_argument("--n-local", type=int, default=None)
    ap.add_argument("--limit-distance", type=int, default=None)
    ap.add_argument("--middle-distance", type=int, default=None)
    ap.add_argument("--from-layer", type=int, default=4, help="first layer with a store")
    ap.add_argument("--blocks", type=int, default=16, help="blocks one bounded search reads")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    configs = [(c, *parse_config(c)) for c in a.configs.split(",")]
    lm = load_model(None, "auto", a.dtype)
    k_max = max(k for _, _, k, _, _, _ in configs) or 1
    settings = LambdaSettings.for_model(lm.adapter.trained_length, n_local=a.n_local, limit_distance=a.limit_distance,
                                        middle_distance=a.middle_distance, middle_top_k=k_max,
                                        middle_from_layer=a.from_layer, middle_blocks=a.blocks)
    engine = Engine(lm, settings)
    text = read_document(a.text).text
    with a.out.open("a") as out:
        for n in parse_lengths(a.lengths, "--lengths"):
            for t, d in enumerate(parse_depths(a.depths)):
                needle = DEFAULT_NEEDLES[t % len(DEFAULT_NEEDLES)]
                h = plant(lm.tokenizer, text, n, [needle], [d])
                t0 = time.perf_counter()
                encoded = encode_document(engine, Document("haystack", h.text), "embedded")
                enc_s = time.perf_counter() - t0
                head = len(lm.tokenizer.encode(encoded.fmt.document_head(), add_special_tokens=False))
                fact = (head + h.positions[0], head + h.positions[0] + len(lm.tokenizer.encode(needle.fact)))
                for name, unit, k, layer, reread, by in configs:
                    cache = encoded.state.cache
                    cache.set_retrieval(k, layer, None, None, unit if unit != "off" else None)
                    t1 = time.perf_counter()
                    span = None
                    if reread and by == "words":
                        span = locate_words(engine, encoded, needle.question, reread)
                    elif k and reread:
                        q = encoded.prompt_ids(engine, encoded.fmt.question(needle.question))
                        span = locate(engine, encoded, q, reread)
                    answer = ask(engine, encoded, needle.question, a.max_new_tokens, reread=reread,
                                 reread_by=by).text()
                    row = {"config": name, "length": n, "tokens": h.tokens, "depth": d,
                           "depth_actual": round(h.depths_actual[0], 3), "n_local": settings.n_local,
                           "limit": settings.limit_distance, "question": needle.question, "answer": answer,
                           "hit": needle.hit(answer), "span": span,
                           "located": None if span is None else bool(span[0] <= fact[0] and fact[1] <= span[1]),
                           "encode_seconds": round(enc_s, 1), "seconds": round(time.perf_counter() - t1, 1)}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
