"""Passkey retrieval (Mohtashami & Jaggi 2023, landmark attention): a key hidden at a chosen
depth in repeated filler, asked for at the end; accuracy by prompt length and depth."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ModelError, UsageError
from ..generate import Engine
from ..memory import check_fits
from ..progress import Progress
from ..prompts import render_template
from ..sampling import SamplingParams
from .baseline import BudgetStop, DenseModel

# -- passkey retrieval -----------------------------------------------------------------

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is"
# The filler cut into its sentences, so prompt lengths can be met to a few tokens.
_SENTENCES = [s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip()]
TEMPLATES = ("plain", "chat")
# Tolerance on prompt length (fraction of the request).
LENGTH_TOLERANCE = 0.02
PROMPT_BYTES_PER_TOKEN = 256  # host memory while a passkey prompt is built: text, ids, tokenizer workspace


@dataclass
class PasskeyPrompt:
    """One passkey prompt: its tokens, the key and where it sits."""

    ids: list[int]
    key: int
    length: int            # requested tokens
    depth: float           # requested depth, 0 = just after the task, 1 = just before the question
    key_position: int      # token index where the key line starts

    @property
    def depth_actual(self) -> float:
        """Where the key line starts, as a fraction of the prompt's tokens."""
        return self.key_position / len(self.ids)


def parse_depths(s: str) -> list[float]:
    """'0.1,0.5,0.9' -> [0.1, 0.5, 0.9]; each must lie in [0, 1]."""
    out: list[float] = []
    parts = str(s).split(",")
    if not str(s).strip() or any(not p.strip() for p in parts):
        raise UsageError(f"--depths: expected a comma-separated list of fractions in [0, 1], got '{s}'")
    for p in parts:
        try:
            d = float(p)
        except ValueError:
            raise UsageError(f"--depths: '{p.strip()}' is not a number (use fractions in [0, 1], e.g. 0.5)") from None
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise UsageError(f"--depths: {p.strip()} is outside 0-1 (0 = start of the text, 1 = its end)")
        if d not in out:
            out.append(d)
    return out


def passkey_key(seed: int, length: int, depth: float, sample: int) -> int:
    """The key for one cell and sample: fixed by the seed, the same for every method."""
    return random.Random(f"{seed}:{length}:{depth}:{sample}").randint(1, 50000)


def _render(tokenizer: Any, n_units: int, k: int, key: int, template: str) -> tuple[str, int]:
    """Prompt text with n_units filler sentences, the key line after the k-th; and where the key line starts."""
    before = " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(k))
    after = " ".join(_SENTENCES[i % len(_SENTENCES)] for i in range(k, n_units))
    head = PASSKEY_TASK + "\n" + (before + "\n" if before else "")
    body = head + PASSKEY_LINE.format(key=key) + "\n" + (after + "\n" if after else "")
    if template == "plain":
        return body + PASSKEY_QUESTION + " " + PASSKEY_ANSWER, len(head)
    messages = [{"role": "user", "content": body + PASSKEY_QUESTION}]
    text = render_template(tokenizer, messages)  # bounded in size and time: the template comes from the model's files
    if body not in text:
        raise ModelError("--template chat: the model's chat template does not keep the message text as it is")
    return text + PASSKEY_ANSWER, text.index(body) + len(head)


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int, template: str = "plain") -> PasskeyPrompt:
    """A passkey prompt of about `length` tokens (within 2% when it can hold that many) with the key at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth must be in [0, 1], got {depth}")
    if template not in TEMPLATES:
        raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, got '{template}'")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UsageError("--template chat: this model's tokenizer has no chat template")
    # The prompt is built as text and ids in host memory, a few copies at a time: a typo
    # in --lengths (1000000000) must be refused here, not end in the kernel's OOM killer.
    check_fits(length * PROMPT_BYTES_PER_TOKEN, "cpu", f"a passkey prompt of {length:,} tokens",
               "use smaller --lengths")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    per_unit = len(encode(" ".join(_SENTENCES * 8))) / (8 * len(_SENTENCES))
    fixed = len(encode(_render(tokenizer, 0, 0, key, template)[0]))
    if length < fixed:
        raise UsageError(f"--lengths: {length} tokens cannot hold the passkey prompt (it needs {fixed})")

    empty_text, empty_key = _render(tokenizer, 0, 0, key, template)
    head = len(encode(empty_text[:empty_key]))  # tokens before the filler starts

    def build(n_units: int) -> tuple[list[int], int]:
        # Put the key line's first token at depth x the prompt's length.
        target = depth * (fixed + n_units * per_unit)
        k = min(n_units, max(0, round((target - head) / per_unit)))
        text, key_char = _render(tokenizer, n_units, k, key, template)
        return encode(text), len(encode(text[:key_char]))

    n_units = max(0, round((length - fixed) / per_unit))
    best: tuple[list[int], int] | None = None
    tried: set[int] = set()
    for _ in range(12):
        ids, key_pos = build(n_units)
        tried.add(n_units)
        if best is None or abs(len(ids) - length) < abs(len(best[0]) - length):
            best = (ids, key_pos)
        diff = length - len(ids)
        if abs(diff) <= max(1, int(LENGTH_TOLERANCE * length) // 4):
            break
        step = round(diff / per_unit) or (1 if diff > 0 else -1)
        n_units = max(0, n_units + step)
        if n_units in tried:
            break
    assert best is not None
    return PasskeyPrompt(best[0], key, length, depth, best[1])


_INTEGER = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
    """The first run of digits in text, as an int (None when there is none)."""
    m = _INTEGER.search(text)
    return int(m.group()) if m else None


def answer_complete(text: str) -> bool:
    """True once text holds a whole integer (digits followed by something else)."""
    return re.search(r"\d+\D", text) is not None


@dataclass
class PasskeyResult:
    """One prompt's outcome under one method; skipped says why it was not run."""

    method: str
    length: int
    depth: float
    sample: int
    key: int
    tokens: int
    key_position: int
    answer: str = ""
    predicted: int | None = None
    correct: bool = False
    seconds: float = 0.0
    skipped: str | None = None


def read_answer(tokens: Iterable[int], tokenizer: Any) -> str:
    """Decode a greedy continuation, stopping as soon as it holds a whole integer."""
    got: list[int] = []
    text = ""
    for t in tokens:
        got.append(t)
        text = tokenizer.decode(got, skip_special_tokens=True)
        if answer_complete(text):
            break
    return text


# Enough for " 12345." even when every digit is its own token.
PASSKEY_NEW_TOKENS = 12


def lminf_answer(engine: Engine, ids: Sequence[int], progress: Progress | None = None) -> str:
    """Greedy answer under LM-Infinite."""
    state = engine.encode(ids, progress=progress)
    return read_answer(engine.generate_ids(state, PASSKEY_NEW_TOKENS, SamplingParams()), engine.lm.tokenizer)


def dense_answer(dense: DenseModel, ids: Sequence[int], stop_ids: Iterable[int] = ()) -> str:
    """Greedy answer under the unmodified model (raises BudgetStop)."""
    return read_answer(dense.generate_greedy(ids, PASSKEY_NEW_TOKENS, stop_ids), dense.lm.tokenizer)


def run_passkey(method: str, prompts: Sequence[tuple[int, PasskeyPrompt]], answer: Callable[[PasskeyPrompt], str],
                progress: Progress | None = None) -> list[PasskeyResult]:
    """Ask each (sample, prompt) through `answer`; a BudgetStop marks that prompt skipped."""
    total = sum(len(p.ids) for _, p in prompts)
    done = 0
    out = []
    for sample, p in prompts:
        r = PasskeyResult(method, p.length, p.depth, sample, p.key, len(p.ids), p.key_position)
        t0 = time.perf_counter()
        try:
            r.answer = answer(p)
        except BudgetStop as stop:
            r.skipped = str(stop)
        r.seconds = time.perf_counter() - t0
        r.predicted = first_integer(r.answer)
        r.correct = r.skipped is None and r.predicted == p.key
        out.append(r)
        done += len(p.ids)
        if progress is not None:
            progress(done, total)
    return out


@dataclass
class Cell:
    """Accuracy of one (length, depth) cell."""

    correct: int = 0
    total: int = 0
    skipped: int = 0

    @property
    def accuracy(self) -> float | None:
        """Fraction correct among the prompts that ran (None if none ran)."""
        return self.correct / self.total if self.total else None


def tally(results: Iterable[Any], column: Callable[[Any], Any], hit: Callable[[Any], bool]
          ) -> dict[str, dict[int, dict[Any, Cell]]]:
    """method -> length -> column -> Cell, from results with .method, .length and .skipped."""
    grid: dict[str, dict[int, dict[Any, Cell]]] = {}
    for r in results:
        cell = grid.setdefault(r.method, {}).setdefault(r.length, {}).setdefault(column(r), Cell())
        if r.skipped:
            cell.skipped += 1
        else:
            cell.total += 1
            cell.correct += int(hit(r))
    return grid


def passkey_grid(results: Iterable[PasskeyResult]) -> dict[str, dict[int, dict[float, Cell]]]:
    """method -> length -> depth -> Cell."""
    return tally(results, lambda r: r.depth, lambda r: r.correct)


@dataclass
class PasskeyReport:
    """All results of one `lminf eval passkey`."""

    meta: dict[str, Any]
    lengths: list[int]
    depths: list[float]
    results: list[PasskeyResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain data for --json: the settings, every answer and the accuracy grid."""
        grid = passkey_grid(self.results)
        acc = {m: {str(n): {str(d): asdict(c) | {"accuracy": c.accuracy} for d, c in row.items()}
                   for n, row in g.items()} for m, g in grid.items()}
        return {**self.meta, "lengths": self.lengths, "depths": self.depths,
                "results": [asdict(r) for r in self.results], "accuracy": acc}
