"""`lminf summarize` step by step on a multi-part document: sections, notes, final prompts, outputs.

The document (the parts joined by blank lines, as `cat` would) is encoded once with a
note per section; every step is logged (each section's first words and its note, the
notes' token count against the window).  Then several wordings of the final request are
tried on the same encoded state (each is a detour: the state is restored between them),
and each output is scored for coverage of the parts' key terms.  JSON lines out.

    PYTHONPATH=. python scripts/summary_steps.py parts/kjv/part*.txt --out steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lminf_cli import prompts
from lminf_cli.documents import read_document
from lminf_cli.eval.summary import join_parts, key_terms, mentioned
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.state_io import save_state
from lminf_cli.tasks import (
    condense_notes,
    encode_document,
    generate_text,
    notes_budget,
    open_state,
    section_bounds,
    section_size,
    summarize,
    tokenize,
)

# name -> (request text with {notes} and {length}, the start of the reply)
# The one request over all notes that lminf made before the summary was written part by part.
BEFORE = ("\n\nThe document has ended. Notes on its successive parts, in order:\n\n{notes}\n\n"
          "Using these notes and what you read, write {length} of the whole document, from beginning to end.")
VARIANTS = {
    "v0-before": (BEFORE, ""),
    "v1-no-ended": ("\n\nNotes on the successive parts of the document above, in order:\n\n{notes}\n\n"
                    "Write {length} of the whole document, covering every part in order.", ""),
    "v2-opener": ("\n\nNotes on the successive parts of the document above, in order:\n\n{notes}\n\n"
                  "Write {length} of the whole document, covering every part in order.", "The document"),
    "v3-topics": ("\n\nNotes on the successive parts of the document above, in order:\n\n{notes}\n\n"
                  "Write {length} of the whole document. Name the topic of each part, in order.",
                  "The document is about"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+")
    ap.add_argument("--length", default="medium")
    ap.add_argument("--variants", default="parts," + ",".join(VARIANTS),
                    help="'parts' is lminf summarize as it is (one request per run of notes)")
    ap.add_argument("--save", type=Path, help="save the encoded document (with its notes) here")
    ap.add_argument("--state", type=Path, help="start from a state saved with --save instead of encoding")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    lm = load_model()
    engine = Engine(lm)
    parts = [read_document(p) for p in a.parts]
    terms = key_terms([p.text for p in parts])
    doc = join_parts(parts)
    out = a.out.open("a")

    def log(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row)[:400], flush=True)

    log({"step": "document", "parts": [p.name for p in parts], "terms": terms,
         "tokens": len(tokenize(engine, doc.text)), "window": engine.settings.n_local})
    size = section_size(engine)
    t0 = time.perf_counter()
    notes_at = []
    if a.state:
        engine, encoded = open_state(a.state, lm)
        notes_at = [(k, len(encoded.notes), note, 0.0) for k, note in enumerate(encoded.notes, 1)]
    else:
        encoded = encode_document(engine, doc, "embedded", notes=True,
                                  on_note=lambda k, n, note: notes_at.append((k, n, note, time.perf_counter())))
        if a.save:
            save_state(a.save, encoded.state, encoded.header, encoded.ids, overwrite=True)
    encode_s = time.perf_counter() - t0
    stream = tokenize(engine, encoded.fmt.document_head() + doc.text.strip())
    bounds = section_bounds(engine, stream, size)
    for (k, n, note, _), (a_, b_) in zip(notes_at, bounds, strict=False):
        section = lm.tokenizer.decode(stream[a_:b_])
        log({"step": "note", "section": k, "of": n, "section_start": section[:120], "note": note,
             "terms_in_section": [t for ts in terms for t in ts if t in section.lower()],
             "terms_in_note": mentioned([t for ts in terms for t in ts], note)})
    notes = condense_notes(engine, encoded, list(encoded.notes), notes_budget(engine))
    log({"step": "condensed", "notes_in": len(encoded.notes), "notes_out": len(notes),
         "encode_and_notes_seconds": round(encode_s, 1)})
    wording = prompts.summary_length(a.length)[0]
    for name in a.variants.split(","):
        if name == "parts":
            t1 = time.perf_counter()
            summary = summarize(engine, encoded, a.length)
            text = summary.text()
            log({"step": "summary", "variant": name, "prompt_tokens": summary.prompt_tokens, "summary": text,
                 "covered": [bool(mentioned(t, text)) for t in terms], "fallback_parts": summary.fallback_parts,
                 "summary_tokens": len(summary.token_ids), "seconds": round(time.perf_counter() - t1, 1)})
            continue
        request, opener = VARIANTS[name]
        listed = "\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1))
        prompt = encoded.header.tail + request.format(notes=listed, length=wording) + encoded.fmt.user_end + opener
        t1 = time.perf_counter()
        text = (opener + " " if opener else "") + generate_text(engine, encoded.state, prompt,
                                                                prompts.summary_length(a.length)[1])
        log({"step": "summary", "variant": name, "prompt_tokens": len(tokenize(engine, prompt)),
             "summary": text, "covered": [bool(mentioned(t, text)) for t in terms],
             "seconds": round(time.perf_counter() - t1, 1)})


if __name__ == "__main__":
    main()
