"""Needle in a haystack on the user's own text: facts planted in real prose, asked about as `lminf ask` asks.

A needle is a fact sentence, a question about it and what counts as a hit (any of the
expected strings in the answer, case-insensitive).  It is planted at a sentence boundary
at a chosen depth of the first `length` tokens of a file; several needles (`needles > 1`)
go at spread depths of the same document and are all asked about, one question each,
on one encode.  The question goes through the same path and chat template as
`lminf ask` (tasks.encode_document + tasks.ask); the unmodified model gets the very same
token stream.  The fair reference for a small model is its own score on short
documents: what lminf must preserve is that score at any length.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..documents import Document
from ..errors import InputError, UsageError
from ..models import LoadedModel
from ..prompts import PromptFormat
from ..sampling import SamplingParams
from ..tasks import ask, open_source
from .baseline import BudgetStop, DenseModel
from .passkey import Cell, tally
from .ppl import tokenize_prefix


@dataclass(frozen=True)
class Needle:
    """A fact, a question about it, and the strings of which any one in an answer is a hit."""

    fact: str
    question: str
    expect: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.fact.strip() or not self.question.strip():
            raise UsageError("a needle needs a fact sentence and a question")
        if not self.expect or not all(e.strip() for e in self.expect):
            raise UsageError("a needle needs at least one non-empty --expect string")

    def hit(self, answer: str) -> bool:
        """Whether the answer contains any expected string (case-insensitive)."""
        low = answer.lower()
        return any(e.strip().lower() in low for e in self.expect)


# Facts that real prose (Shakespeare, essays) does not contain; each is checked against the haystack.
DEFAULT_NEEDLES = (
    Needle("The combination of the iron vault in the old library is 7294.",
           "What is the combination of the iron vault in the old library?", ("7294",)),
    Needle("The keeper of the Gull Rock lighthouse is a woman named Orla Fenwick.",
           "What is the name of the keeper of the Gull Rock lighthouse?", ("Orla", "Fenwick")),
    Needle("The blue schooner Marigold sailed from Bristol to Zanzibar.",
           "Where did the blue schooner Marigold sail to?", ("Zanzibar",)),
    Needle("The secret password of the guild of clockmakers is tangerine.",
           "What is the secret password of the guild of clockmakers?", ("tangerine",)),
    Needle("The stolen treasure of the abbey is buried under the windmill at Fenby.",
           "Where is the stolen treasure of the abbey buried?", ("windmill",)),
)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a new sentence starts (after . ! ? and the space after it, or a blank line)."""
    return [m.end() for m in _SENTENCE_END.finditer(text)]


@dataclass
class Haystack:
    """One document with needles planted: its text, and where each needle went."""

    text: str
    length: int                 # tokens asked for
    tokens: int                 # tokens of the text as written (the chat template's head not counted)
    needles: list[Needle]
    depths: list[float]         # depth asked for, per needle
    positions: list[int] = field(default_factory=list)  # token index where each needle starts

    @property
    def depths_actual(self) -> list[float]:
        """Where each needle starts, as a fraction of the document's tokens."""
        return [p / self.tokens for p in self.positions]


def plant(tokenizer: Any, text: str, length: int, needles: Sequence[Needle], depths: Sequence[float]) -> Haystack:
    """The first tokens of `text` with each needle inserted at the sentence boundary nearest its depth,
    `length` tokens in all (within a sentence).  Refuses a text that already holds an expected answer."""
    if len(needles) != len(depths):
        raise ValueError("one depth per needle")
    extra = sum(len(tokenizer.encode(" " + n.fact, add_special_tokens=False)) for n in needles)
    if length <= extra + 16:
        raise UsageError(f"--lengths: {length} tokens cannot hold the needles ({extra} tokens)")
    ids = tokenize_prefix(tokenizer, text, length - extra)
    if len(ids) < length - extra:
        raise InputError(f"the haystack text has {len(ids):,} tokens; {length:,} were asked for")
    hay = tokenizer.decode(ids)
    for n in needles:
        for e in n.expect:
            if re.search(rf"\b{re.escape(e.strip())}\b", hay, re.IGNORECASE):  # as a word: "Orla" is not in "world"
                raise InputError(f"the haystack text already contains '{e.strip()}' (the answer to "
                                 f"'{n.question}'): choose another needle or text")
    bounds = [0, *sentence_boundaries(hay), len(hay)]  # the very start and end count as boundaries
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    cuts: list[int] = []
    for i in order:
        want = depths[i] * len(hay)
        free = [b for b in bounds if not cuts or b > cuts[-1]] or [len(hay)]
        cuts.append(min(free, key=lambda b: abs(b - want)))
    pieces, last = [], 0
    starts: dict[int, int] = {}
    for i, cut in zip(order, cuts, strict=True):
        pieces.append(hay[last:cut])
        prefix = "".join(pieces)
        sep = "" if not prefix or prefix[-1].isspace() else " "
        starts[i] = len(tokenizer.encode(prefix + sep, add_special_tokens=False))
        pieces.append(sep + needles[i].fact + (" " if cut < len(hay) and not hay[cut].isspace() else ""))
        last = cut
    pieces.append(hay[last:])
    full = "".join(pieces)
    total = len(tokenizer.encode(full, add_special_tokens=False))
    return Haystack(full, length, total, list(needles), list(depths), [starts[i] for i in range(len(needles))])


@dataclass
class NeedleResult:
    """One question of one trial under one method; skipped says why it was not asked."""

    method: str
    length: int
    trial: int
    needle: int                 # index in the trial's needle list
    depth: float
    depth_actual: float
    tokens: int
    question: str
    expect: list[str]
    answer: str = ""
    hit: bool = False
    seconds: float = 0.0
    skipped: str | None = None


Answerer = Callable[[Haystack], list[str]]


def lminf_answers(lm: LoadedModel, requested: Mapping[str, Any], max_new_tokens: int, reread: int = 0,
                  reread_by: str = "words", sampling: SamplingParams | None = None) -> Answerer:
    """Answers through `lminf ask`'s own path: the document opened as ask opens it, encoded once,
    then each needle's question asked (re-reading its passage when `reread`)."""
    def answer(h: Haystack) -> list[str]:
        engine, encoded = open_source(Document("haystack", h.text), lm, requested)
        return [ask(engine, encoded, n.question, max_new_tokens, sampling, reread, reread_by).text()
                for n in h.needles]
    return answer


def dense_answers(dense: DenseModel, max_new_tokens: int, stop_ids: Iterable[int] = ()) -> Answerer:
    """Answers of the unmodified model on the same token stream (the whole conversation written out)."""
    fmt = PromptFormat.for_tokenizer(dense.lm.tokenizer)
    stops = list(stop_ids)

    def answer(h: Haystack) -> list[str]:
        out = []
        for n in h.needles:
            ids = dense.lm.tokenizer.encode(fmt.document_head() + h.text.strip() + fmt.question(n.question),
                                            add_special_tokens=False)
            tokens = list(dense.generate_greedy(ids, max_new_tokens, stops))
            out.append(dense.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return out
    return answer


def trials(lengths: Sequence[int], depths: Sequence[float], needles: Sequence[Needle],
           per_trial: int) -> list[tuple[int, int, list[Needle], list[float]]]:
    """(length, trial, needles, depths) to run.  One needle per trial: each depth with each needle
    in turn (needle i at depth i modulo their number); several: `per_trial` needles at spread depths."""
    out = []
    for n in lengths:
        if per_trial == 1:
            for t, d in enumerate(depths):
                out.append((n, t, [needles[t % len(needles)]], [d]))
        else:
            if per_trial > len(needles):
                raise UsageError(f"--needles {per_trial}: only {len(needles)} different needles are given")
            spread = [round((i + 0.5) / per_trial, 3) for i in range(per_trial)]
            out.append((n, 0, list(needles[:per_trial]), spread))
    return out


def run_needles(method: str, tokenizer: Any, text: str, plan: Sequence[tuple[int, int, list[Needle], list[float]]],
                answer: Answerer, on_trial: Callable[[int, int], None] | None = None) -> list[NeedleResult]:
    """Plant and ask every trial of `plan` with `answer`; a BudgetStop marks a trial skipped."""
    results = []
    for k, (length, t, needles, depths) in enumerate(plan):
        h = plant(tokenizer, text, length, needles, depths)
        t0 = time.perf_counter()
        try:
            answers, skipped = answer(h), None
        except BudgetStop as stop:
            answers, skipped = [""] * len(needles), str(stop)
        seconds = (time.perf_counter() - t0) / max(len(needles), 1)
        for i, (n, a) in enumerate(zip(needles, answers, strict=True)):
            results.append(NeedleResult(method, length, t, i, depths[i], round(h.depths_actual[i], 3), h.tokens,
                                        n.question, list(n.expect), a, skipped is None and n.hit(a), round(seconds, 2),
                                        skipped))
        if on_trial is not None:
            on_trial(k + 1, len(plan))
    return results


def needle_grid(results: Iterable[NeedleResult], by_depth: bool) -> dict[str, dict[int, dict[Any, Cell]]]:
    """method -> length -> depth (or "all") -> Cell of hits."""
    return tally(results, (lambda r: r.depth) if by_depth else (lambda r: "all"), lambda r: r.hit)


@dataclass
class NeedleReport:
    """All results of one `lminf eval needle`."""

    meta: dict[str, Any]
    lengths: list[int]
    depths: list[float]
    per_trial: int
    results: list[NeedleResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain data for --json: the settings, every answer and the hit grid."""
        grid = needle_grid(self.results, self.per_trial == 1)
        acc = {m: {str(n): {str(d): asdict(c) | {"accuracy": c.accuracy} for d, c in row.items()}
                   for n, row in g.items()} for m, g in grid.items()}
        return {**self.meta, "lengths": self.lengths, "depths": self.depths, "needles_per_trial": self.per_trial,
                "results": [asdict(r) for r in self.results], "accuracy": acc}
