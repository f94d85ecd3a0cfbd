"""Length generalisation, measured: perplexity by position and passkey retrieval.

Three ways to score the same tokens:
  * LM-Infinite (`Engine.token_nll`): constant memory, any length;
  * the unmodified model (`DenseModel.nll`): dense attention over everything read
    so far, through the HF KV cache, until it stops fitting (time, length or
    memory budget; the stop is recorded, not raised);
  * the truncation baseline (`DenseModel.window_nll`): the unmodified model
    re-reading only the last L tokens, in distribution but blind to the rest.

Passkey retrieval follows Mohtashami & Jaggi (2023, landmark attention): a key
hidden at a chosen depth in repeated filler, asked for at the end.

Nothing here prints; progress goes through an optional callback.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, ModelError, UsageError
from .generate import Engine, SamplingParams
from .long_text import tokenize_long
from .memory import check_fits
from .models import LoadedModel, past_keyword, past_of
from .units import format_length

Progress = Callable[[int, int], None]

LMINF, VANILLA, WINDOW = "lminf", "vanilla", "window"
METHOD_LABELS = {LMINF: "LM-Infinite", VANILLA: "unmodified", WINDOW: "window baseline"}
BASELINES = (VANILLA, WINDOW)

# Rows of hidden states turned into logits at once: bounds the [rows, vocab] workspace.
_HEAD_ROWS = 256
# Left free when deciding whether the next dense chunk still fits.
_MEMORY_MARGIN = 512 * 1024 ** 2


# -- budgets -----------------------------------------------------------------------


@dataclass
class Budget:
    """Where the unmodified model must stop: seconds, tokens, bytes (None = no limit).

    memory_bytes None means "what the device reports free" (checked before each chunk).
    """

    seconds: float | None = None
    max_tokens: int | None = None
    memory_bytes: int | None = None


class BudgetStop(Exception):
    """Raised inside a dense run when a budget is spent; the message says which."""


def available_memory_bytes(device: torch.device) -> int | None:
    """Free device memory: CUDA's free bytes, or the kernel's MemAvailable on CPU (see memory.py)."""
    from .memory import available_bytes

    return available_bytes(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's failure to allocate."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# -- per-token scores and their buckets --------------------------------------------


@dataclass
class Scored:
    """Per-token NLL of one method: nll[i] is the NLL of the token at position i + 1."""

    method: str
    nll: Tensor
    seconds: float
    requested: int                 # tokens the run was asked to read
    stop_reason: str | None = None  # why it read fewer, if it did
    per_stream: tuple[Tensor, ...] = ()  # after average_streams: each stream's own NLL

    @property
    def tokens_read(self) -> int:
        """Tokens of the stream covered (scored ones plus the unscored first)."""
        return self.nll.numel() + 1 if self.nll.numel() else 0

    @property
    def mean_nll(self) -> float:
        """Mean NLL over every scored token."""
        return float(self.nll.double().mean()) if self.nll.numel() else float("nan")


@dataclass
class Bucket:
    """Mean NLL of the scored tokens at positions [start, end)."""

    start: int
    end: int
    tokens: int
    nll: float

    @property
    def ppl(self) -> float:
        """Perplexity, exp(mean NLL)."""
        return math.exp(self.nll) if self.tokens else float("nan")


def bucket_means(nll: Tensor, bucket: int, n_tokens: int | None = None) -> list[Bucket]:
    """Aggregate per-token NLL (nll[i] for position i + 1) into buckets of `bucket` positions.

    Bucket b spans positions [b * bucket, (b + 1) * bucket); position 0 is never scored,
    so the first bucket holds bucket - 1 tokens; the last may be partial.  n_tokens
    (default: what nll covers) fixes how many buckets there are; buckets past the
    scored tokens get tokens = 0 and nll = nan.
    """
    if bucket <= 0:
        raise UsageError(f"--bucket must be a positive number of tokens, got {bucket}")
    covered = nll.numel() + 1 if nll.numel() else 0
    n = covered if n_tokens is None else n_tokens
    values = torch.cat([torch.full((1,), float("nan"), dtype=torch.float64), nll.double()])  # [covered]
    out = []
    for start in range(0, n, bucket):
        end = min(start + bucket, n)
        seg = values[start:min(end, covered)]
        seg = seg[~torch.isnan(seg)]
        out.append(Bucket(start, end, int(seg.numel()), float(seg.mean()) if seg.numel() else float("nan")))
    return out


def span_mean(nll: Tensor, start: int, end: int) -> float:
    """Mean NLL of the tokens at positions [start, end) (nan if none scored)."""
    seg = nll[max(start - 1, 0):max(end - 1, 0)]
    return float(seg.double().mean()) if seg.numel() else float("nan")


# -- reading the text ----------------------------------------------------------------


def tokenize_prefix(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The first max_tokens tokens of text, tokenizing only as much text as needed."""
    n_chars = max(1024, max_tokens * 6)
    while True:
        ids = tokenize_long(tokenizer, text[:n_chars])  # in pieces: a whole book stays within bounded memory
        # One spare token: a word cut at n_chars may tokenize differently.
        if len(ids) > max_tokens + 1 or n_chars >= len(text):
            return ids[:max_tokens]
        n_chars *= 2


def skip_tokens(ids: Sequence[int], offset: int, name: str) -> list[int]:
    """ids without its first `offset` tokens (to score a later stretch of a file)."""
    if offset < 0:
        raise UsageError(f"--offset must be zero or more tokens, got {offset}")
    if offset and len(ids) <= offset:
        raise InputError(f"{name} has {len(ids):,} tokens, not more than --offset {offset:,}")
    return list(ids[offset:])


def check_streams(streams: int) -> None:
    """--streams counts stretches of the file: one or more."""
    if streams < 1:
        raise UsageError(f"--streams must be 1 or more, got {streams}")


def split_streams(ids: Sequence[int], streams: int, length: int, name: str) -> list[list[int]]:
    """`streams` consecutive stretches of `length` tokens from the start of ids.

    One stream may be shorter than `length` (the whole file is scored); several must
    each be full, or the average by position would mix different counts.
    """
    check_streams(streams)
    if streams == 1:
        return [list(ids[:length])]
    if len(ids) < streams * length:
        raise InputError(f"{name} has {len(ids):,} tokens; {streams} streams of {length:,} need "
                         f"{streams * length:,}: use fewer --streams or a smaller --max-length")
    return [list(ids[i * length:(i + 1) * length]) for i in range(streams)]


def average_streams(runs: Sequence[Scored]) -> Scored:
    """One method's runs over several streams as one: the mean NLL at each position.

    Positions count from each stream's start, so the text's own ups and downs average
    out while effects of position stay.  Only positions that every stream scored are
    kept (a baseline may stop early in one of them).
    """
    if len(runs) == 1:
        return runs[0]
    m = min(r.nll.numel() for r in runs)
    nll = torch.stack([r.nll[:m] for r in runs]).mean(dim=0)                     # [m]
    reason = next((r.stop_reason for r in runs if r.stop_reason), None)
    return Scored(runs[0].method, nll, sum(r.seconds for r in runs), runs[0].requested, reason,
                  tuple(r.nll for r in runs))


# -- LM-Infinite and the unmodified model --------------------------------------------


def lminf_nll(engine: Engine, ids: Sequence[int], progress: Progress | None = None) -> Scored:
    """Per-token NLL under LM-Infinite, with constant memory."""
    t0 = time.perf_counter()
    nll = engine.token_nll(ids, progress)
    return Scored(LMINF, nll, time.perf_counter() - t0, len(ids))


class DenseModel:
    """The unmodified model (dense causal attention, HF KV cache), within a Budget.

    Logits exist for at most _HEAD_ROWS rows at a time, so memory is the KV cache
    plus one chunk's attention, not n x vocab.
    """

    def __init__(self, lm: LoadedModel, chunk_size: int = 512, budget: Budget | None = None) -> None:
        if chunk_size <= 0:
            raise UsageError(f"--chunk-size must be a positive number of tokens, got {chunk_size}")
        self.lm = lm
        self.chunk_size = chunk_size
        self.budget = budget or Budget()
        model = lm.model
        self.body = getattr(model, model.base_model_prefix)   # the decoder without its LM head
        self.head = model.get_output_embeddings()
        self._past_kw = past_keyword(self.body)
        a = lm.adapter
        self._kv_bytes_per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * lm.dtype.itemsize
        self._vocab = int(model.config.vocab_size)
        self._t0 = time.perf_counter()

    # -- budget checks ------------------------------------------------------------
    def start_clock(self) -> None:
        """Start the time budget now."""
        self._t0 = time.perf_counter()

    def _check_time(self) -> None:
        b = self.budget
        if b.seconds is not None and time.perf_counter() - self._t0 > b.seconds:
            raise BudgetStop(f"time budget of {b.seconds:g} s spent")

    def memory_needed(self, n_new: int, n_total: int) -> int:
        """Rough bytes one chunk of n_new tokens needs on top of the cache, with n_total tokens read."""
        a = self.lm.adapter
        # Scores + softmax of one chunk over every key, a re-allocated layer of cache, the logits.
        return (3 * a.n_heads * n_new * n_total * 4
                + 2 * self._kv_bytes_per_token // a.n_layers * n_total
                + self._kv_bytes_per_token * n_new
                + 3 * min(n_new, _HEAD_ROWS) * self._vocab * 4)

    def _check_memory(self, n_new: int, n_total: int) -> None:
        """Stop before a chunk whose attention workspace and cache growth would not fit."""
        free = self.budget.memory_bytes
        if free is None:
            free = available_memory_bytes(self.lm.device)
            if free is None:
                return
            free -= _MEMORY_MARGIN
        need = self.memory_needed(n_new, n_total)
        if need > free:
            raise BudgetStop(f"out of memory: {n_total:,} tokens of dense attention need about "
                             f"{need / 1024 ** 3:.1f} GiB more, {max(free, 0) / 1024 ** 3:.1f} GiB free")

    # -- forward passes -----------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, x: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """x [1, C] after what cache holds -> final hidden states [1, C, hidden], cache."""
        try:
            out = self.body(input_ids=x, use_cache=True, **{self._past_kw: cache})
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if is_out_of_memory(exc):
                raise BudgetStop(f"out of memory: {str(exc).splitlines()[0][:120]}") from exc
            raise
        return out.last_hidden_state, past_of(out)

    @torch.inference_mode()
    def _rows_nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """hidden [T, hidden] predicting targets [T] -> NLL [T] (float32, CPU)."""
        out = torch.empty(targets.numel(), dtype=torch.float32)
        for s in range(0, targets.numel(), _HEAD_ROWS):
            e = min(targets.numel(), s + _HEAD_ROWS)
            logp = torch.log_softmax(self.head(hidden[s:e]).float(), dim=-1)  # [rows, V]
            out[s:e] = -logp.gather(1, targets[s:e, None])[:, 0].cpu()
        return out

    def _ids(self, ids: Sequence[int] | Tensor) -> Tensor:
        t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
        return t.reshape(1, -1).to(self.lm.device)  # [1, n]

    def _span_nll(self, x: Tensor, start: int, end: int, score_from: int,
                  done: Callable[[int], None] | None = None) -> Tensor:
        """Read x[start:end] from an empty cache; NLL of the tokens at positions [max(score_from, start+1), end)."""
        cache = None
        parts = []
        for s in range(start, end, self.chunk_size):
            e = min(end, s + self.chunk_size)
            self._check_time()
            self._check_memory(e - s, e - start)
            hidden, cache = self._forward(x[:, s:e], cache)
            # hidden row i predicts position i + 1; keep rows whose target is scored and exists.
            lo, hi = max(s, score_from - 1), min(e, end - 1)
            if hi > lo:
                parts.append(self._rows_nll(hidden[0, lo - s:hi - s], x[0, lo + 1:hi + 1]))
            if done is not None:
                done(e)
        return torch.cat(parts) if parts else torch.empty(0)

    def nll(self, ids: Sequence[int] | Tensor, progress: Progress | None = None) -> Scored:
        """Per-token NLL with dense attention over everything read, until a budget stops it."""
        x = self._ids(ids)
        n = x.shape[1]
        limit = n if self.budget.max_tokens is None else min(n, self.budget.max_tokens)
        self.start_clock()
        parts: list[Tensor] = []
        reason = None
        if limit < n:
            reason = f"reached the baseline length limit of {limit:,} tokens"
        # Read in one cache, chunk by chunk.  A chunk [s, e) scores the tokens at positions
        # [s, e): the last hidden row of the previous chunk is carried over to predict token s,
        # so a stop leaves exactly the tokens read scored.
        cache, carry = None, None
        try:
            for s in range(0, limit, self.chunk_size):
                e = min(limit, s + self.chunk_size)
                self._check_time()
                self._check_memory(e - s, e)
                hidden, cache = self._forward(x[:, s:e], cache)
                rows = hidden[0] if carry is None else torch.cat([carry, hidden[0]])  # [C (+1), hidden]
                first = max(s, 1)  # position predicted by rows[0]
                if e > first:
                    parts.append(self._rows_nll(rows[:e - first], x[0, first:e]))
                carry = hidden[0, -1:]
                if progress is not None:
                    progress(e, limit)
        except BudgetStop as stop:
            reason = str(stop)
        del cache
        nll = torch.cat(parts) if parts else torch.empty(0)
        return Scored(VANILLA, nll, time.perf_counter() - self._t0, n, reason)

    def window_nll(self, ids: Sequence[int] | Tensor, window: int, stride: int,
                   progress: Progress | None = None) -> Scored:
        """The truncation baseline: each stride of tokens is scored by a fresh read of at most `window` tokens.

        The first `window` tokens are read once, with everything before them visible
        (the same as the unmodified model); after that the tokens at positions
        [a, a + stride) are scored from a read of [a + stride - window, a + stride),
        so each sees between window - stride and window - 1 earlier tokens.
        """
        if not 0 < stride < window:
            raise UsageError(f"window stride must be in 1..{window - 1}, got {stride}")
        x = self._ids(ids)
        n = x.shape[1]
        limit = n if self.budget.max_tokens is None else min(n, self.budget.max_tokens)
        self.start_clock()
        parts: list[Tensor] = []
        reason = f"reached the baseline length limit of {limit:,} tokens" if limit < n else None
        segments = [(1, min(window, limit))]
        segments += [(a, min(a + stride, limit)) for a in range(window, limit, stride)]
        try:
            for a, b in segments:
                start = max(0, b - window)
                parts.append(self._span_nll(x, start, b, a))
                if progress is not None:
                    progress(b, limit)
        except BudgetStop as stop:
            reason = str(stop)
        nll = torch.cat(parts) if parts else torch.empty(0)
        return Scored(WINDOW, nll, time.perf_counter() - self._t0, n, reason)

    @torch.inference_mode()
    def generate_greedy(self, ids: Sequence[int] | Tensor, max_new_tokens: int,
                        stop_ids: Iterable[int] = ()) -> Iterator[int]:
        """Greedy continuation of ids under dense attention (raises BudgetStop)."""
        x = self._ids(ids)
        n = x.shape[1]
        if self.budget.max_tokens is not None and n > self.budget.max_tokens:
            raise BudgetStop(f"longer than the baseline length limit of {self.budget.max_tokens:,} tokens")
        self._check_time()
        cache = None
        hidden = None
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            self._check_memory(e - s, e)
            hidden, cache = self._forward(x[:, s:e], cache)
        stops = set(stop_ids)
        for i in range(max_new_tokens):
            token = int(torch.argmax(self.head(hidden[0, -1:]).float()[0]))
            if token in stops:
                return
            yield token
            if i + 1 < max_new_tokens:
                hidden, cache = self._forward(torch.tensor([[token]], device=self.lm.device), cache)


# -- perplexity report ---------------------------------------------------------------


def flatness(nll: Tensor, trained_length: int) -> dict[str, Any] | None:
    """How flat NLL stays: mean over [L/2, L) and each aligned L/2 span after it.

    For L = 8k: the reference is 4k-8k and the spans are 8k-12k, 12k-16k, ...
    None when fewer than L tokens were scored.
    """
    span = trained_length // 2
    covered = nll.numel() + 1
    if span == 0 or covered < trained_length:
        return None
    ref = span_mean(nll, span, trained_length)
    spans = []
    for start in range(trained_length, covered, span):
        end = min(start + span, covered)
        if end - start < span // 2:
            break  # a short tail says more about its text than about position
        spans.append({"start": start, "end": end, "nll": span_mean(nll, start, end)})
    worst = max((abs(s["nll"] - ref) for s in spans), default=0.0)
    return {"reference": {"start": span, "end": trained_length, "nll": ref}, "spans": spans,
            "max_deviation": worst}


def ppl_report(runs: Sequence[Scored], bucket: int, trained_length: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything `lminf eval ppl` shows, as plain data (the --json output)."""
    n = max(r.requested for r in runs)
    methods: dict[str, Any] = {}
    for r in runs:
        methods[r.method] = {
            "label": METHOD_LABELS[r.method],
            "tokens_read": r.tokens_read,
            "mean_nll": r.mean_nll,
            "seconds": round(r.seconds, 2),
            "stopped_at": r.tokens_read if r.stop_reason else None,
            "stop_reason": r.stop_reason,
            "buckets": [asdict(b) | {"ppl": b.ppl} for b in bucket_means(r.nll, bucket, n)],
        }
        if r.per_stream:
            # Each stream's bucket means too: methods can then be compared stream by stream.
            methods[r.method]["stream_buckets"] = [[b.nll for b in bucket_means(x, bucket, n)] for x in r.per_stream]
    summary: dict[str, Any] = {}
    by = {r.method: r for r in runs}
    if LMINF in by:
        summary["flatness"] = flatness(by[LMINF].nll, trained_length)
    # Past L, on the tokens both scored: what the reach beyond the window is worth.
    for base in BASELINES:
        if LMINF in by and base in by:
            m = min(by[LMINF].nll.numel(), by[base].nll.numel())
            if m + 1 > trained_length:
                lo = trained_length - 1
                summary[f"past_trained_length_vs_{base}"] = {
                    "start": trained_length, "end": m + 1,
                    LMINF: float(by[LMINF].nll[lo:m].double().mean()),
                    base: float(by[base].nll[lo:m].double().mean()),
                }
    return {**meta, "tokens": n, "bucket": bucket, "trained_length": trained_length,
            "methods": methods, "summary": summary}


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], lo: float, hi: float, width: int = 100) -> str:
    """One character per value (averaged down to `width`), scaled between lo and hi; nan -> ' '."""
    vals = list(values)
    if len(vals) > width:
        step = math.ceil(len(vals) / width)
        groups = [vals[i:i + step] for i in range(0, len(vals), step)]
        vals = [_nanmean(g) for g in groups]
    out = []
    for v in vals:
        if math.isnan(v):
            out.append(" ")
            continue
        frac = 0.0 if hi <= lo else (min(max(v, lo), hi) - lo) / (hi - lo)
        out.append(SPARKS[min(len(SPARKS) - 1, int(frac * len(SPARKS)))])
    return "".join(out)


def _nanmean(xs: Sequence[float]) -> float:
    good = [x for x in xs if not math.isnan(x)]
    return sum(good) / len(good) if good else float("nan")


def plot_nll(report: dict[str, Any], path: str | Path) -> None:
    """NLL by position for each method, the trained length marked, saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for m in report["methods"].values():
        xs = [(b["start"] + b["end"]) / 2 / 1024 for b in m["buckets"] if b["tokens"]]
        ys = [b["nll"] for b in m["buckets"] if b["tokens"]]
        ax.plot(xs, ys, marker=".", linewidth=1.2, label=m["label"])
    L = report["trained_length"]
    ax.axvline(L / 1024, color="grey", linestyle="--", linewidth=1)
    ax.text(L / 1024, ax.get_ylim()[1], f" trained length ({format_length(L)})", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position (k tokens)")
    ax.set_ylabel(f"mean NLL per {format_length(report['bucket'])} bucket (nats)")
    ax.set_title(f"{report.get('model', '')}: {report.get('file', '')}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib (pip install 'lminf[bench]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Fail early (before a long run) when --plot cannot work."""
    _pyplot()


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
    from .prompts import render_template  # bounded in size and time: the template comes from the model's files

    messages = [{"role": "user", "content": body + PASSKEY_QUESTION}]
    text = render_template(tokenizer, messages)
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
    return read_answer(engine.generate(state, PASSKEY_NEW_TOKENS, SamplingParams()), engine.lm.tokenizer)


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


def passkey_grid(results: Iterable[PasskeyResult]) -> dict[str, dict[int, dict[float, Cell]]]:
    """method -> length -> depth -> Cell."""
    grid: dict[str, dict[int, dict[float, Cell]]] = {}
    for r in results:
        cell = grid.setdefault(r.method, {}).setdefault(r.length, {}).setdefault(r.depth, Cell())
        if r.skipped:
            cell.skipped += 1
        else:
            cell.total += 1
            cell.correct += int(r.correct)
    return grid


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


def plot_passkey(report: PasskeyReport, path: str | Path) -> None:
    """Accuracy heatmaps (length x depth), one panel per method, saved as PNG."""
    plt = _pyplot()
    grid = passkey_grid(report.results)
    methods = list(grid)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods) + 0.8, 0.5 * len(report.lengths) + 2),
                             dpi=120, squeeze=False)
    image = None
    for ax, m in zip(axes[0], methods, strict=True):
        data = [[_cell_value(grid[m].get(n, {}).get(d)) for d in report.depths] for n in report.lengths]
        image = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, n in enumerate(report.lengths):
            for j, d in enumerate(report.depths):
                c = grid[m].get(n, {}).get(d)
                label = "-" if c is None or c.accuracy is None else f"{c.correct}/{c.total}"
                ax.text(j, i, label, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(report.depths)), [f"{d:g}" for d in report.depths])
        ax.set_yticks(range(len(report.lengths)), [format_length(n) for n in report.lengths])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(METHOD_LABELS[m])
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _cell_value(c: Cell | None) -> float:
    return float("nan") if c is None or c.accuracy is None else c.accuracy


def check_file_long_enough(n_tokens: int, bucket: int, name: str) -> None:
    """A file must hold at least one bucket of tokens to be scored."""
    if n_tokens < bucket:
        raise InputError(f"{name} has {n_tokens:,} tokens, fewer than one --bucket ({bucket:,}); "
                         "use a longer text or a smaller --bucket")
