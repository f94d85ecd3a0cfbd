"""Perplexity by position: per-token NLL of each method, bucket means, flatness, the report."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, UsageError
from ..generate import Engine
from ..long_text import tokenize_long
from ..progress import Progress
from .baseline import BASELINES, LMINF, METHOD_LABELS, Scored

# -- per-token scores and their buckets --------------------------------------------


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


def check_file_long_enough(n_tokens: int, bucket: int, name: str) -> None:
    """A file must hold at least one bucket of tokens to be scored."""
    if n_tokens < bucket:
        raise InputError(f"{name} has {n_tokens:,} tokens, fewer than one --bucket ({bucket:,}); "
                         "use a longer text or a smaller --bucket")
