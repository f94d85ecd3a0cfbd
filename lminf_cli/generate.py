"""Encoding and generation over one loaded model: step -> token stream -> text.

`Engine` is the Python API the tasks, the bench and eval share:

    lm = load_model()                              # models.load_model
    engine = Engine(lm)                            # Λ-attention with the paper's defaults
    state = engine.encode(ids)                     # the cache + the next token's logits
    for r in engine.stream_generate(state, 200):   # one GenerationResponse per token
        print(r.text, end="")
    text = engine.generate(state, 200)             # or all of it at once

Every forward is one step of the cache's protocol (see LambdaCache):
`plan = cache.plan(n, retrieve_last)` -> `adapter.forward(ids, cache, plan, rows)` ->
`cache.commit(plan)`, replayed from a CUDA graph when the step allows it.  Nothing here
prints; progress is reported through an optional callback.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import CacheSnapshot, LambdaCache
from .errors import UsageError
from .graphs import graphable, graphed
from .memory import check_fits, peak_bytes
from .models import LoadedModel
from .progress import Progress
from .sampling import MAX_REPEAT_LAST_N, Sampler, SamplingParams, make_sampler
from .settings import LambdaSettings

LAST_ROW = slice(-1, None)


@dataclass
class GenerationMetrics:
    """Counters and timings of everything encoded into and generated from one state."""

    prompt_tokens: int = 0
    encode_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    peak_memory_bytes: int = 0

    @property
    def encode_tps(self) -> float:
        """Encode throughput in tokens per second."""
        return self.prompt_tokens / self.encode_seconds if self.encode_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Decode throughput in tokens per second."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def copy(self) -> GenerationMetrics:
        """These counters as they are now (to measure one reply: later.since(earlier))."""
        return dataclasses.replace(self, step_seconds=list(self.step_seconds))

    def since(self, earlier: GenerationMetrics) -> GenerationMetrics:
        """What was encoded and generated after `earlier` was copied (peak memory: the peak so far)."""
        return GenerationMetrics(
            prompt_tokens=self.prompt_tokens - earlier.prompt_tokens,
            encode_seconds=self.encode_seconds - earlier.encode_seconds,
            generated_tokens=self.generated_tokens - earlier.generated_tokens,
            decode_seconds=self.decode_seconds - earlier.decode_seconds,
            step_seconds=self.step_seconds[len(earlier.step_seconds):],
            cache_bytes=self.cache_bytes, peak_memory_bytes=self.peak_memory_bytes)

    @property
    def median_step_seconds(self) -> float:
        """Median latency of one decode step."""
        if not self.step_seconds:
            return 0.0
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2]


@dataclass
class StateSnapshot:
    """A state to come back to: the cache's snapshot, the logits and the recent ids of that moment."""

    cache: CacheSnapshot
    logits: Tensor | None
    recent_ids: tuple[int, ...] = ()


def _recent() -> deque[int]:
    return deque(maxlen=MAX_REPEAT_LAST_N)


@dataclass
class State:
    """An encoded stream: the cache plus the logits for the next token.

    `recent_ids`: the last ids of the stream (at most MAX_REPEAT_LAST_N), what a repetition
    penalty looks back on.  A state loaded from a file starts without them: the prompt
    that follows fills them.
    """

    cache: LambdaCache
    logits: Tensor | None
    metrics: GenerationMetrics
    recent_ids: deque[int] = field(default_factory=_recent)

    @property
    def n_tokens(self) -> int:
        """Tokens encoded (and generated) so far."""
        return self.cache.length

    def snapshot(self, budget: int) -> StateSnapshot:
        """A point to come back to after appending at most `budget` tokens (see LambdaCache.snapshot)."""
        return StateSnapshot(self.cache.snapshot(budget), None if self.logits is None else self.logits.clone(),
                             tuple(self.recent_ids))

    def restore(self, snap: StateSnapshot) -> None:
        """Back to `snap`, bit for bit."""
        self.cache.restore(snap.cache)
        self.logits = None if snap.logits is None else snap.logits.clone()
        self.recent_ids.clear()
        self.recent_ids.extend(snap.recent_ids)


@dataclass(frozen=True)
class GenerationResponse:
    """One step of stream_generate: the text the new token completes, and where generation stands.

    The last response of a stream has `finish_reason` ("stop": an end token was sampled,
    and is in the cache but not in the text, or a stop sequence was produced; "length":
    max_new_tokens reached), no token, and any text held back for a stop sequence that
    did not come.  (tasks adds "loop": a reply stopped because it repeated itself, and
    "cancelled".)
    """

    text: str
    token: int | None
    generated: int               # tokens generated so far (the stop token not counted)
    generation_tps: float
    peak_memory_bytes: int
    finish_reason: str | None = None


def sync(device: torch.device) -> None:
    """Wait for queued device work, so timers read real elapsed time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class IncrementalDecoder:
    """Token ids -> text deltas, holding back partial UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopText:
    """Text deltas -> the text that may be shown, ending at the first stop sequence.

    A stop sequence can arrive split over several tokens, so the end of the text that
    could still become one is held back until the next delta decides.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """(text to show now, whether a stop sequence was reached)."""
        if not self.stops:
            return delta, False
        if self.stopped:
            return "", True
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """What was held back, once nothing follows (it never became a stop sequence)."""
        out, self.pending = self.pending, ""
        return out


class Engine:
    """LM-Infinite inference over one loaded model, under one LambdaSettings."""

    def __init__(self, lm: LoadedModel, settings: LambdaSettings | None = None, fused: bool = True,
                 graphs: str = "auto") -> None:
        self.lm = lm
        self.adapter = lm.adapter
        if settings is None:
            settings = LambdaSettings.for_model(self.adapter.trained_length)
        window = self.adapter.max_local()
        if window is not None and window < settings.n_local:
            # Every layer slides within a tighter window of its own: the ring need not be larger.
            settings = settings.replace(n_local=window)
        self.settings = settings
        self.fused = fused
        # Forwards on a GPU replay a captured graph once shapes stop changing (graphs.py): "auto"
        # does that on CUDA only; "static" runs the same static-buffer path without capturing
        # (on any device: the tests check it on the CPU); "off" never.
        if graphs not in ("auto", "static", "off"):
            raise ValueError(f"graphs must be auto, static or off, got {graphs!r}")
        self.graphs = "off" if graphs == "auto" and lm.device.type != "cuda" else graphs

    @property
    def chunk_size(self) -> int:
        """Tokens per prefill forward."""
        return self.settings.chunk_size

    def new_cache(self) -> LambdaCache:
        """An empty constant-size cache for this model and settings (refused first if it cannot fit)."""
        s = self.settings
        check_fits(self.adapter.cache_bytes(s), self.lm.device,
                   f"the attention cache (n_local {s.n_local:,} + chunk {s.chunk_size:,} + n_global {s.n_global:,} "
                   "tokens)", "a smaller window, chunk or number of first tokens")
        return self.adapter.new_cache(s, fused=self.fused)

    def new_state(self) -> State:
        """A state with nothing encoded yet."""
        cache = self.new_cache()
        return State(cache, None, GenerationMetrics(cache_bytes=cache.nbytes))

    def _ids(self, ids: Sequence[int] | Tensor) -> Tensor:
        t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
        return t.reshape(1, -1).to(self.lm.device)  # [1, n]

    # -- one step of the protocol ---------------------------------------------
    def forward(self, cache: LambdaCache, ids: Tensor, rows: slice | None = None,
                retrieve_last: bool = False) -> Tensor | None:
        """Add ids [1, C] (C <= chunk size) to the cache: plan -> forward -> commit.

        Returns logits [1, len(rows), V] for `rows`, or None.  `retrieve_last`: the last
        row will be continued, so it retrieves middle tokens when retrieval is on.
        """
        plan = cache.plan(ids.shape[1], retrieve_last, static=self.graphs != "off")
        if self.graphs != "off" and rows in (None, LAST_ROW) and graphable(cache, plan):
            key = (plan.n_new, rows is not None)
            # A weak reference: the cache keeps its graphs, and a strong one would make a cycle.
            proxy = weakref.proxy(cache)
            graph = graphed(cache, key, lambda x, p: self.adapter.forward(x, proxy, p, rows), plan,
                            capture=self.graphs == "auto")
            logits = graph.run(ids, plan)
        else:
            logits = self.adapter.forward(ids, cache, plan, rows)
        cache.commit(plan)
        return logits

    # -- encoding ---------------------------------------------------------------
    def encode(self, ids: Sequence[int] | Tensor, state: State | None = None, *, continued: bool = True,
               progress: Progress | None = None) -> State:
        """Feed tokens through the model in chunks; return the state after them.

        `continued`: generation follows from the last token (its logits are sampled), so
        that row retrieves middle tokens when retrieval is on (paper, final version).
        Encode a document that a prompt will follow with continued=False: then the state
        is the same whether the document went in at once or in sections.
        """
        x = self._ids(ids)
        n = x.shape[1]
        if state is None:
            state = self.new_state()
        if n == 0:
            return state
        sync(self.lm.device)
        t0 = time.perf_counter()
        logits = None
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            last = e == n
            logits = self.forward(state.cache, x[:, s:e], rows=LAST_ROW if last else None,
                                  retrieve_last=last and continued)
            if progress is not None:
                progress(e, n)
        state.logits = logits[0, -1]
        tail = ids[-MAX_REPEAT_LAST_N:]
        state.recent_ids.extend(tail.reshape(-1).tolist() if isinstance(tail, Tensor) else tail)
        sync(self.lm.device)
        m = state.metrics
        m.prompt_tokens += n
        m.encode_seconds += time.perf_counter() - t0
        m.cache_bytes = state.cache.nbytes
        m.peak_memory_bytes = peak_bytes(self.lm.device)
        return state

    def token_nll(self, ids: Sequence[int] | Tensor, progress: Progress | None = None) -> Tensor:
        """Negative log-likelihood of each token after the first ([n - 1], float32, CPU).

        Logits exist one chunk at a time, so memory stays constant in n.  Scoring never retrieves.
        """
        x = self._ids(ids)
        n = x.shape[1]
        cache = self.new_cache()
        out = torch.empty(max(n - 1, 0), dtype=torch.float32)
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            logits = self.forward(cache, x[:, s:e], rows=slice(None))[0]          # [C, V]
            targets = x[0, s + 1:e + 1]                                          # [C or C-1]
            logp = torch.log_softmax(logits[: targets.numel()].float(), dim=-1)
            out[s:s + targets.numel()] = -logp.gather(1, targets[:, None])[:, 0].cpu()
            if progress is not None:
                progress(e, n)
        return out

    # -- generation: step -> stream -> text --------------------------------------
    def step(self, state: State, token: int) -> Tensor:
        """Append one token (a row that will be continued); return the logits for the next one ([V])."""
        x = torch.full((1, 1), token, dtype=torch.long, device=self.lm.device)
        state.logits = self.forward(state.cache, x, rows=LAST_ROW, retrieve_last=True)[0, -1]
        state.recent_ids.append(token)
        return state.logits

    def generate_step(self, state: State, sampler: Sampler) -> Iterator[int]:
        """Sample a token from the state's logits, step it into the cache, yield it; forever.

        Every sampled token goes into the cache, an end token included, so the state
        stays a faithful transcript for follow-up prompts.
        """
        if state.logits is None:
            raise UsageError("nothing has been encoded yet")
        m = state.metrics
        while True:
            t0 = time.perf_counter()
            token = sampler(state.logits)
            self.step(state, token)
            sync(self.lm.device)
            dt = time.perf_counter() - t0
            m.step_seconds.append(dt)
            m.decode_seconds += dt
            m.generated_tokens += 1
            yield token

    def _tokens(self, state: State, max_new_tokens: int, sampling: SamplingParams | None,
                stop_ids: Sequence[int] | None) -> Iterator[tuple[int, bool]]:
        """(token, is_stop) for up to max_new_tokens sampled tokens, ending after a stop token."""
        params = sampling or SamplingParams()
        # The sampler works where the logits are (the head's device, when a device map splits the model).
        device = state.logits.device if state.logits is not None else self.lm.device
        sampler = make_sampler(params, device, state.recent_ids if params.penalized else ())
        stops = set(self.stop_ids() if stop_ids is None else stop_ids)
        steps = self.generate_step(state, sampler)
        for _ in range(max_new_tokens):
            token = next(steps)
            yield token, token in stops
            if token in stops:
                return

    def generate_ids(self, state: State, max_new_tokens: int, sampling: SamplingParams | None = None,
                     stop_ids: Sequence[int] | None = None) -> Iterator[int]:
        """The generated token ids (a stop token ends them and is not yielded), as they come."""
        for token, stop in self._tokens(state, max_new_tokens, sampling, stop_ids):
            if not stop:
                yield token

    def stream_generate(self, state: State, max_new_tokens: int, sampling: SamplingParams | None = None,
                        stop_ids: Sequence[int] | None = None) -> Iterator[GenerationResponse]:
        """Up to max_new_tokens responses (text deltas), then one that says why generation finished.

        An end token or one of `sampling.stop`'s texts ends the stream ("stop"); the text of
        a stop sequence is not in the output (what might begin one is held back until it
        cannot), though its tokens are in the cache.
        """
        decoder = IncrementalDecoder(self.lm.tokenizer)
        stop_text = StopText((sampling or SamplingParams()).stop)
        generated, t0, reason = 0, time.perf_counter(), "length"
        peak = state.metrics.peak_memory_bytes
        for token, stop in self._tokens(state, max_new_tokens, sampling, stop_ids):
            if stop:
                reason = "stop"
                break
            generated += 1
            text, stopped = stop_text.push(decoder.push(token))
            yield GenerationResponse(text, token, generated, generated / (time.perf_counter() - t0), peak)
            if stopped:
                reason = "stop"
                break
        elapsed = time.perf_counter() - t0
        state.metrics.peak_memory_bytes = max(peak, peak_bytes(self.lm.device))
        yield GenerationResponse(stop_text.flush(), None, generated, generated / elapsed if elapsed else 0.0,
                                 state.metrics.peak_memory_bytes, reason)

    def generate(self, state: State, max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop_ids: Sequence[int] | None = None) -> str:
        """The whole generated text at once."""
        return "".join(r.text for r in self.stream_generate(state, max_new_tokens, sampling, stop_ids))

    def stop_ids(self) -> list[int]:
        """End-of-sequence ids of the tokenizer and generation config."""
        ids: set[int] = set()
        eos = getattr(self.lm.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        gen = getattr(self.lm.model, "generation_config", None)
        g_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(g_eos, int):
            ids.add(g_eos)
        elif g_eos:
            ids.update(int(i) for i in g_eos)
        return sorted(ids)
