"""Which passage of a document is a question about?  Its words, weighted by how rare they are (BM25).

A question about a fact usually shares its rarer words with the sentence that states
it ("the iron vault in the old library").  Scoring overlapping passages of the
document by those words (Okapi BM25: term frequency saturated, weighted by inverse
document frequency, normalised by passage length) finds the passage to read again
before the question, with no model compute: a few milliseconds per 100k tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Words too common to say where a question points (English; other languages still work
# through IDF, which discounts words found in most passages).
_STOP_TEXT = """
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor
not now of off on once only or other our ours ourselves out over own same she should so some such than
that the their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
document passage text question answer tell say said
"""
STOPWORDS = frozenset(_STOP_TEXT.split())
K1, B = 1.2, 0.75  # the usual BM25 constants
# Tokens of the passage re-read before a question about a document longer than the window
# (chosen on real text with scripts/needle_sweep.py: docs/results.md), and how it is found.
DEFAULT_REREAD = 512
REREAD_BY = ("words", "attention")


def terms(text: str) -> list[str]:
    """Lower-cased words of text without stopwords and one-letter words."""
    return [w for w in (m.group().lower() for m in _WORD.finditer(text)) if len(w) > 1 and w not in STOPWORDS]


def bm25_scores(passages: Sequence[str], query: str) -> list[float]:
    """BM25 score of each passage for the query's terms (0 for a passage sharing none of them)."""
    wanted = set(terms(query))
    if not wanted or not passages:
        return [0.0] * len(passages)
    counts = [Counter(t for t in terms(p) if t in wanted) for p in passages]
    lengths = [max(1, len(p.split())) for p in passages]
    mean = sum(lengths) / len(lengths)
    n = len(passages)
    df = Counter(t for c in counts for t in c)
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in wanted}
    out = []
    for c, length in zip(counts, lengths, strict=True):
        norm = K1 * (1 - B + B * length / mean)
        out.append(sum(idf[t] * f * (K1 + 1) / (f + norm) for t, f in c.items()))
    return out
