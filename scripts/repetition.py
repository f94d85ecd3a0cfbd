"""How repetitive generated text is: distinct-4-gram ratio and the longest verbatim repeat.

    # any text (e.g. a continuation) on stdin or in files:
    lminf corpus macbeth | lminf continue - -n 200 | python scripts/repetition.py

    # one encode, several sampling settings (the measurement in docs/usage.md):
    PYTHONPATH=. python scripts/repetition.py continue play.txt --tokens 200 --seeds 1,2,3
    PYTHONPATH=. python scripts/repetition.py ask doc.txt "Question one?" "Question two?"

Words are the text split at whitespace, lowercased.  distinct-4 is the number of
different 4-word sequences over the number of 4-word sequences (1.0: nothing repeats;
a text stuck in a loop falls towards 0).  The longest repeat is the longest word
sequence that occurs twice or more (occurrences may overlap), in words.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(text: str, n: int = 4) -> float:
    """Distinct n-grams of words over all n-grams (1.0 for a text shorter than n words)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeat(text: str) -> tuple[int, str]:
    """(length in words, the words) of the longest word sequence occurring at least twice."""
    w = words(text)
    best, end = 0, 0
    # run[j]: length of the common suffix of w[:i] and w[:j] (j < i), one row at a time.
    prev = [0] * (len(w) + 1)
    for i in range(1, len(w) + 1):
        row = [0] * (len(w) + 1)
        for j in range(1, i):
            if w[i - 1] == w[j - 1]:
                row[j] = prev[j - 1] + 1
                if row[j] > best:
                    best, end = row[j], i
        prev = row
    return best, " ".join(w[end - best:end])


def measure(text: str) -> dict:
    n, span = longest_repeat(text)
    return {"words": len(words(text)), "distinct4": round(distinct_n(text), 3), "longest_repeat": n,
            "repeat": span}


# Sampling settings compared (SamplingParams fields); "greedy" is what lminf did before.
CONTINUE_CONFIGS = {
    "greedy (before)": {},
    "t=0.7 (issue)": {"temperature": 0.7},
    "t=0.7 top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "t=0.8 top-p 0.95 min-p 0.05": {"temperature": 0.8, "top_p": 0.95, "min_p": 0.05},
    "t=0.8 top-p 0.95 min-p 0.05 penalty 1.1/64": {"temperature": 0.8, "top_p": 0.95, "min_p": 0.05,
                                                   "repeat_penalty": 1.1, "repeat_last_n": 64},
    "t=0.7 top-p 0.9 penalty 1.1/64": {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1,
                                       "repeat_last_n": 64},
    "greedy penalty 1.1/64": {"repeat_penalty": 1.1, "repeat_last_n": 64},
    "greedy penalty 1.2/64": {"repeat_penalty": 1.2, "repeat_last_n": 64},
}
ASK_CONFIGS = {
    "greedy (before)": {},
    "greedy penalty 1.1/64": {"repeat_penalty": 1.1, "repeat_last_n": 64},
    "greedy penalty 1.2/64": {"repeat_penalty": 1.2, "repeat_last_n": 64},
}


def _defaults(task: str) -> dict:
    """lminf's defaults for the embedded model (which ships no sampling settings of its own)."""
    import dataclasses

    from lminf_cli.sampling import ANSWER_DEFAULTS, CONTINUE_DEFAULTS

    d = CONTINUE_DEFAULTS if task == "continue" else ANSWER_DEFAULTS
    return {k: v for k, v in dataclasses.asdict(d).items() if k not in ("seed", "stop")}


def _configs(table: dict, chosen: str | None, task: str) -> dict:
    table = {**table, "defaults (after)": _defaults(task)}
    if not chosen:
        return table
    return {k: v for k, v in table.items() if k in chosen.split(";")}


def run_continue(args) -> None:
    from lminf_cli.documents import read_document
    from lminf_cli.models import load_model
    from lminf_cli.sampling import SamplingParams
    from lminf_cli.tasks import engine_for

    lm = load_model(args.model)
    engine = engine_for(lm)
    ids = lm.tokenizer.encode(read_document(args.file).text, add_special_tokens=False)
    t0 = time.perf_counter()
    state = engine.encode(ids)
    print(f"# {args.file}: {len(ids):,} tokens encoded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    snap = state.snapshot(args.tokens + 1)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name, kw in _configs(CONTINUE_CONFIGS, args.configs, "continue").items():
        runs = []
        for seed in seeds if kw.get("temperature") else seeds[:1]:
            state.restore(snap)
            text = engine.generate(state, args.tokens, SamplingParams(**kw, seed=seed))
            m = measure(text)
            runs.append(m)
            print(json.dumps({"config": name, "seed": seed, **m, "text": text}, ensure_ascii=False), flush=True)
        rows.append((name, runs))
    _table(rows)


def run_ask(args) -> None:
    from lminf_cli.documents import read_document
    from lminf_cli.models import load_model
    from lminf_cli.sampling import SamplingParams
    from lminf_cli.tasks import ask, open_source

    lm = load_model(args.model)
    engine, encoded = open_source(read_document(args.file), lm)
    rows = []
    for name, kw in _configs(ASK_CONFIGS, args.configs, "answer").items():
        runs = []
        for q in args.questions:
            r = ask(engine, encoded, q, args.tokens, SamplingParams(**kw))
            text = r.text()
            m = {**measure(text), "finish": r.finish_reason}
            runs.append(m)
            print(json.dumps({"config": name, "question": q, **m, "text": text}, ensure_ascii=False), flush=True)
        rows.append((name, runs))
    _table(rows)


def _table(rows) -> None:
    print(f"\n{'settings':46s} {'runs':>4s} {'distinct-4':>10s} {'longest repeat (words)':>23s}")
    for name, runs in rows:
        d = statistics.mean(r["distinct4"] for r in runs)
        n = [r["longest_repeat"] for r in runs]
        print(f"{name:46s} {len(runs):4d} {d:10.3f} {statistics.mean(n):14.1f} (max {max(n)})")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("continue", "ask"):
        text = "".join(Path(f).read_text() for f in sys.argv[1:]) if sys.argv[1:] else sys.stdin.read()
        print(json.dumps(measure(text), ensure_ascii=False))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["continue", "ask"])
    ap.add_argument("file")
    ap.add_argument("questions", nargs="*")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--seeds", default="1,2,3", help="seeds of the sampled settings (continue)")
    ap.add_argument("--configs", default=None, help="only these settings, by name, ';'-separated")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    (run_continue if args.mode == "continue" else run_ask)(args)


if __name__ == "__main__":
    main()
