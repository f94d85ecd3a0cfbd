"""The unmodified model, as a baseline: dense attention over everything read (HF KV cache)
until a budget stops it, or the truncation baseline that re-reads only the last L tokens.

Stops (time, length, memory) are recorded, not raised, so a report can say where and why
the unmodified model gave up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from ..memory import available_bytes
from ..models import LoadedModel, past_keyword, past_of
from ..progress import Progress

LMINF, LAMBDA, VANILLA, WINDOW = "lminf", "lambda", "vanilla", "window"
METHOD_LABELS = {LMINF: "LM-Infinite", LAMBDA: "Λ-attention alone", VANILLA: "unmodified",
                 WINDOW: "window baseline"}
BASELINES = (VANILLA, WINDOW)

# Rows of hidden states turned into logits at once: bounds the [rows, vocab] workspace.
_HEAD_ROWS = 256
# Left free when deciding whether the next dense chunk still fits.
_MEMORY_MARGIN = 512 * 1024 ** 2


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
class Budget:
    """Where the unmodified model must stop: seconds, tokens, bytes (None = no limit).

    memory_bytes None means "what the device reports free" (checked before each chunk).
    """

    seconds: float | None = None
    max_tokens: int | None = None
    memory_bytes: int | None = None


class BudgetStop(Exception):
    """Raised inside a dense run when a budget is spent; the message says which."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's failure to allocate."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


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
            free = available_bytes(self.lm.device)
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
