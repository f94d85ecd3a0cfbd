"""Tokenizing long texts in pieces: the same ids as one call, in bounded memory, Ctrl-C responsive.

One tokenizer call on 50 MB of text holds several GB of intermediate structures and,
being one call into Rust, ignores Ctrl-C for a minute.  Cut at line starts into
pieces of PIECE_CHARS, the text takes a few tens of MB at a time and Python gets
control (and handles signals) between pieces.

Pieces give the same ids as one call only where the tokenizer never merges across
the cut.  That is so before a line break for the usual byte-level BPE tokenizers
(their pre-tokenizer splits there), but not for all (a SentencePiece tokenizer adds
a space marker at the start of every call), so every cut is checked on the text
around it: tokenize(left + right) must equal tokenize(left) + tokenize(right).  A cut
that fails moves to an earlier line; if no nearby line passes, the whole text is
tokenized in one call as before.
"""

from __future__ import annotations

from typing import Any

PIECE_CHARS = 1 << 18   # characters per tokenizer call: ~0.1 s and a few tens of MB
SEAM_CHARS = 400        # text on each side of a cut that is tokenized to check it
SEAM_TRIES = 64         # earlier line breaks tried before giving up on piecewise tokenizing


def encode(tokenizer: Any, text: str) -> list[int]:
    """One tokenizer call, no special tokens added (prompts carry their own)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_long(tokenizer: Any, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """encode(tokenizer, text), computed piece by piece when the text is long (same ids)."""
    if len(text) <= 2 * piece_chars:
        return encode(tokenizer, text)
    cuts = seams(tokenizer, text, piece_chars)
    if cuts is None:
        return encode(tokenizer, text)
    ids: list[int] = []
    start = 0
    for cut in [*cuts, len(text)]:
        ids += encode(tokenizer, text[start:cut])
        start = cut
    return ids


def seams(tokenizer: Any, text: str, piece_chars: int = PIECE_CHARS) -> list[int] | None:
    """Where to cut `text` (at line breaks, about piece_chars apart, each checked), or None if it cannot be cut."""
    cuts: list[int] = []
    start = 0
    while len(text) - start > 2 * piece_chars:
        cut = _checked_cut(tokenizer, text, start, start + piece_chars)
        if cut is None:
            return None
        cuts.append(cut)
        start = cut
    return cuts


def _checked_cut(tokenizer: Any, text: str, start: int, target: int) -> int | None:
    """A cut before `target` (and after start + half a piece) where the tokenizer splits, or None.

    Candidates are the starts of the whitespace runs that hold a line break ("end.|\n",
    "word|  \n"), or a space when the stretch has no line break at all (one long line):
    byte-level BPE pre-tokenizers never join a run of whitespace to the visible character
    before it, and tokenize the run the same whatever precedes it.  Each candidate is
    still checked, since some tokenizers do join (Llama 3 keeps ".\n" together;
    SentencePiece marks the start of every call).
    """
    floor = start + (target - start) // 2
    separator = "\n" if text.find("\n", floor, target) >= 0 else " "
    end = target
    for _ in range(SEAM_TRIES):
        at = text.rfind(separator, floor, end)
        if at < 0:
            return None
        cut = at
        while cut > floor and text[cut - 1].isspace():
            cut -= 1
        end = cut
        if cut <= floor:
            return None
        left, right = text[max(start, cut - SEAM_CHARS):cut], text[cut:cut + SEAM_CHARS]
        if encode(tokenizer, left + right) == encode(tokenizer, left) + encode(tokenizer, right):
            return cut
    return None
