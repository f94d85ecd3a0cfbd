"""Why the distance cap must not exceed the window: one passkey prompt, several readers.

Asks the 16k passkey prompt (seed 0, depth 0.9: the key ~1.6k tokens before the
question, inside any window tried) of
  * the unmodified model reading only the last W tokens (truncation), with and
    without the task sentence in front;
  * Λ-attention with window W and the distance cap at 8192 (n_global 1, 4, 10, 100)
    and with the cap at W.
docs/results.md ("How the recipe was found") reports what each answered.

    PYTHONPATH=. python scripts/window_cap_check.py --window 2048
"""

from __future__ import annotations

import argparse

import torch

from lminf_cli.eval import passkey as ev
from lminf_cli.generate import Engine
from lminf_cli.models import load_model
from lminf_cli.settings import LambdaSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--depth", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=2048)
    a = ap.parse_args()
    lm = load_model(None, "auto", "auto")
    tok = lm.tokenizer
    key = ev.passkey_key(0, a.length, a.depth, 0)
    ids = ev.passkey_prompt(tok, a.length, a.depth, key, "plain").ids
    task = ids[:100]  # the task sentence and the first filler

    def truncated(prompt: list[int]) -> str:
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        return tok.decode(out[0, len(prompt):])

    w = a.window
    print(f"key {key}, {len(ids)} tokens")
    print(f"unmodified, last {w} tokens:            {truncated(ids[-w:])!r}")
    print(f"unmodified, task + last {w} tokens:     {truncated(task + ids[-w:])!r}")
    trained = lm.adapter.trained_length
    for glob, cap in [(1, trained), (4, trained), (10, trained), (100, trained), (100, w)]:
        settings = LambdaSettings.for_model(trained, n_global=glob, n_local=w, limit_distance=cap)
        answer = ev.lminf_answer(Engine(lm, settings), ids)
        print(f"lambda, window {w}, n_global {glob:>3}, cap {cap}: {answer!r}")


if __name__ == "__main__":
    main()
