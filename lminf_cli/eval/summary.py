"""Does a summary cover the whole document?  Coverage of multi-part texts, beside an oracle.

K parts (unrelated texts) are concatenated, as a user who cats files together would, and
summarized the way `lminf summarize` does.  A part is covered when any of its key terms
(given, or extracted: the part's most distinctive proper nouns) appears in the summary.
The oracle is the same model summarizing each part alone: coverage can only be as good
as what the model writes about a part it is shown by itself.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..documents import Document
from ..errors import UsageError

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)([A-Za-z][A-Za-z'-]+)")
TERMS_PER_PART = 5


def key_terms(parts: Sequence[str], per_part: int = TERMS_PER_PART) -> list[list[str]]:
    """The most distinctive proper nouns of each part: words written capitalized in mid-sentence
    (not only as a sentence's first word), seldom in lower case, frequent in their part and rare in
    the others.  Plays' speaker names in capitals count: comparisons are case-insensitive."""
    caps, lower, starts = [], [], []
    for text in parts:
        words = _WORD.findall(text)
        caps.append(Counter(w.lower() for w in words if w[0].isupper()))
        lower.append(Counter(w for w in words if w[0].islower()))
        starts.append(Counter(m.group(1).lower() for m in _SENTENCE_START.finditer(text)))
    out = []
    for i in range(len(parts)):
        scored = []
        for word, n in caps[i].items():
            mid = n - starts[i][word]  # capitalized where no sentence starts: a name, not just a first word
            if len(word) < 3 or mid < 2 or lower[i][word] > 0.2 * n:
                continue
            elsewhere = sum(c[word] + low[word] for j, (c, low) in enumerate(zip(caps, lower, strict=True)) if j != i)
            if mid > elsewhere:  # more here than in all the other parts together: this part's own
                scored.append((mid / (1 + elsewhere), mid, word))
        scored.sort(reverse=True)
        out.append([w for _, _, w in scored[:per_part]])
    return out


def mentioned(terms: Sequence[str], text: str) -> list[str]:
    """The terms that appear in text as whole words (case-insensitive)."""
    low = text.lower()
    return [t for t in terms if re.search(rf"\b{re.escape(t.lower())}\b", low)]


def parse_terms(given: Sequence[str] | None, n_parts: int) -> list[list[str]] | None:
    """--terms values, one per part in order, each a comma-separated list (None: extract them)."""
    if not given:
        return None
    if len(given) != n_parts:
        raise UsageError(f"--terms: give one list per part ({n_parts}), in order; got {len(given)}")
    lists = [[t.strip() for t in g.split(",") if t.strip()] for g in given]
    if any(not t for t in lists):
        raise UsageError("--terms: every part needs at least one term")
    return lists


def join_parts(parts: Sequence[Document]) -> Document:
    """The parts as one plain text (blank lines between them, no headers: what `cat` would give)."""
    text = "\n\n".join(p.text.strip() for p in parts)
    return Document(name=" + ".join(p.name for p in parts), text=text)


@dataclass
class PartCoverage:
    """One part: its key terms, and which of them a summary mentions."""

    name: str
    tokens: int
    terms: list[str]
    in_summary: list[str]
    in_oracle: list[str] | None = None   # in the summary of this part alone
    oracle: str | None = None

    @property
    def covered(self) -> bool:
        """Whether the whole document's summary mentions this part."""
        return bool(self.in_summary)


@dataclass
class SummaryReport:
    """Everything `lminf eval summary` reports (its --json output)."""

    meta: dict[str, Any]
    summary: str
    notes: list[str]
    fallback_parts: list[int]  # parts (1-based) whose reply gave way to the section notes
    timings: dict[str, float]
    parts: list[PartCoverage] = field(default_factory=list)

    @property
    def fallback(self) -> bool:
        """Whether any part of the summary is the section notes standing in for the model's reply."""
        return bool(self.fallback_parts)

    @property
    def coverage(self) -> float:
        """Fraction of parts the summary mentions."""
        return sum(p.covered for p in self.parts) / len(self.parts) if self.parts else 0.0

    @property
    def oracle_coverage(self) -> float | None:
        """Fraction of parts the model mentions when it summarizes each alone (None when not run)."""
        if not self.parts or any(p.in_oracle is None for p in self.parts):
            return None
        return sum(bool(p.in_oracle) for p in self.parts) / len(self.parts)

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {**self.meta, "summary": self.summary, "notes": self.notes, "fallback": self.fallback,
                "fallback_parts": self.fallback_parts,
                "timings": self.timings, "coverage": self.coverage, "oracle_coverage": self.oracle_coverage,
                "parts": [asdict(p) | {"covered": p.covered} for p in self.parts]}


Summarizer = Callable[[Document], Any]  # a document -> a tasks.Summary, fully generated


def evaluate_summary(parts: Sequence[Document], summarize: Summarizer, count_tokens: Callable[[str], int],
                     terms: list[list[str]] | None = None, oracle: bool = True,
                     meta: dict[str, Any] | None = None) -> SummaryReport:
    """Summarize the joined parts (and, for the oracle, each part alone); score coverage."""
    if len(parts) < 2:
        raise UsageError("eval summary needs at least two parts (one file each)")
    terms = terms or key_terms([p.text for p in parts])
    t0 = time.perf_counter()
    whole = summarize(join_parts(parts))
    text = whole.text()
    timings = {**whole.timings, "total": round(time.perf_counter() - t0, 2)}
    report = SummaryReport(meta or {}, text, list(whole.source_notes), list(whole.fallback_parts), timings)
    for part, t in zip(parts, terms, strict=True):
        report.parts.append(PartCoverage(part.name, count_tokens(part.text), t, mentioned(t, text)))
    if oracle:
        for part, cov in zip(parts, report.parts, strict=True):
            alone = summarize(part).text()
            cov.oracle, cov.in_oracle = alone, mentioned(cov.terms, alone)
    return report
