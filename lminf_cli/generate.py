"""Encoding and generation: step -> token stream -> text stream.

`Engine` is the Python API the CLI, bench and eval share:

    lm = load_model()                       # models.load_model
    engine = Engine(lm)                     # Λ-attention with the paper's defaults
    state = engine.encode(lm.tokenizer.encode(text))
    for piece in engine.stream_text(state, max_new_tokens=200):
        ...

Nothing here prints; progress is reported through an optional callback.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import LambdaCache, LambdaSettings
from .errors import UsageError
from .graphs import graphed_forward, graphed_step
from .models import LoadedModel

# Measured on 2 CPU cores with SmolLM2-135M, window full, local branch split (LocalSplit):
# 4.19 ms per token at 256-token chunks, 3.80 at 512, 3.95 at 1024.
DEFAULT_CHUNK_SIZE = 512
# Measured on an H100 with a Llama-2-7B shape (graphed chunks, 32k tokens): 256 -> 3.3 s,
# 512 -> 2.6 s, 1024 -> 2.4 s; 512 keeps the ring (n_local + chunk) small.
DEFAULT_CUDA_CHUNK_SIZE = 512


def default_chunk_size(device: torch.device) -> int:
    """Prefill block size for a device (a saved state keeps the one it was made with)."""
    return DEFAULT_CUDA_CHUNK_SIZE if device.type == "cuda" else DEFAULT_CHUNK_SIZE

Progress = Callable[[int, int], None]


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise UsageError for values outside their ranges."""
        if not 0 <= self.temperature < float("inf"):  # written so that nan fails too
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationMetrics:
    """Counters and timings of one encode + generate, shared by the CLI and bench."""

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

    @property
    def median_step_seconds(self) -> float:
        """Median latency of one decode step."""
        if not self.step_seconds:
            return 0.0
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2]


@dataclass
class State:
    """An encoded stream: the cache plus the logits for the next token."""

    cache: LambdaCache
    logits: Tensor | None
    metrics: GenerationMetrics

    @property
    def n_tokens(self) -> int:
        """Tokens encoded (and generated) so far."""
        return self.cache.length


def sync(device: torch.device) -> None:
    """Wait for queued device work, so timers read real elapsed time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Sampler:
    """Turns a logits row into a token id under SamplingParams."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        params.validate()
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits.float() / p.temperature  # [V]
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, -1) > p.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


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


class Engine:
    """LM-Infinite inference over one loaded model."""

    def __init__(self, lm: LoadedModel, settings: LambdaSettings | None = None,
                 chunk_size: int | None = None, fused: bool = True, cuda_graphs: bool = True) -> None:
        if chunk_size is None:
            chunk_size = default_chunk_size(lm.device)
        if chunk_size <= 0:
            raise UsageError(f"--chunk-size must be a positive number of tokens, got {chunk_size}")
        self.lm = lm
        self.adapter = lm.adapter
        if settings is None:
            settings = LambdaSettings.for_model(self.adapter.trained_length)
        window = self.adapter.max_local()
        if window is not None and window < settings.n_local:
            # Every layer slides within a tighter window of its own: the ring need not be larger.
            settings = dataclasses.replace(settings, n_local=window)
        self.settings = settings
        self.chunk_size = chunk_size
        self.fused = fused
        # Decode steps on a GPU replay a captured graph once shapes stop changing (graphs.py).
        self.cuda_graphs = cuda_graphs

    def _graphs_on(self) -> bool:
        return self.cuda_graphs and self.lm.device.type == "cuda"

    def new_cache(self) -> LambdaCache:
        """An empty constant-size cache for this model and settings."""
        return self.adapter.new_cache(self.settings, self.chunk_size, fused=self.fused)

    def _ids(self, ids: Sequence[int] | Tensor) -> Tensor:
        t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
        return t.reshape(1, -1).to(self.lm.device)  # [1, n]

    def encode(self, ids: Sequence[int] | Tensor, state: State | None = None,
               progress: Progress | None = None) -> State:
        """Feed tokens through the model in chunks; return the state after them."""
        x = self._ids(ids)
        n = x.shape[1]
        if state is None:
            state = State(self.new_cache(), None, GenerationMetrics())
        if n == 0:
            return state
        sync(self.lm.device)
        t0 = time.perf_counter()
        logits = None
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            # Only the row that will be continued retrieves middle tokens (paper, final version).
            state.cache.retrieve_last_row = e == n
            if self._graphs_on():
                logits = graphed_forward(self.adapter, state.cache, x[:, s:e], logits=e == n)
            else:
                logits = self.adapter.forward(x[:, s:e], state.cache, rows=slice(-1, None) if e == n else None)
            if progress is not None:
                progress(e, n)
        state.cache.retrieve_last_row = False
        state.logits = logits[0, -1]
        sync(self.lm.device)
        m = state.metrics
        m.prompt_tokens += n
        m.encode_seconds += time.perf_counter() - t0
        m.cache_bytes = state.cache.nbytes
        m.peak_memory_bytes = peak_memory_bytes(self.lm.device)
        return state

    def token_nll(self, ids: Sequence[int] | Tensor, progress: Progress | None = None) -> Tensor:
        """Negative log-likelihood of each token after the first ([n - 1], float32, CPU).

        Logits exist one chunk at a time, so memory stays constant in n.
        """
        x = self._ids(ids)
        n = x.shape[1]
        cache = self.new_cache()
        out = torch.empty(max(n - 1, 0), dtype=torch.float32)
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            logits = self.adapter.forward(x[:, s:e], cache, rows=slice(None))[0]  # [C, V]
            targets = x[0, s + 1:e + 1]                                         # [C or C-1]
            logp = torch.log_softmax(logits[: targets.numel()].float(), dim=-1)
            out[s:s + targets.numel()] = -logp.gather(1, targets[:, None])[:, 0].cpu()
            if progress is not None:
                progress(e, n)
        return out

    def step(self, state: State, token: int) -> Tensor:
        """Append one token; return the logits for the next one ([V])."""
        state.cache.retrieve_last_row = True
        if self._graphs_on():
            state.logits = graphed_step(self.adapter, state.cache, token)
        else:
            x = torch.tensor([[token]], dtype=torch.long, device=self.lm.device)
            state.logits = self.adapter.forward(x, state.cache, rows=slice(-1, None))[0, -1]
        state.cache.retrieve_last_row = False
        return state.logits

    def generate(self, state: State, max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop_ids: Sequence[int] | None = None) -> Iterator[int]:
        """Yield up to max_new_tokens sampled tokens, stopping at a stop id."""
        if state.logits is None:
            raise UsageError("nothing has been encoded yet")
        sampler = Sampler(sampling or SamplingParams(), self.lm.device)
        stops = set(self.stop_ids() if stop_ids is None else stop_ids)
        m = state.metrics
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            token = sampler(state.logits)
            # Every emitted token, the stop token included, goes into the cache so
            # the state stays a faithful transcript for follow-up questions.
            self.step(state, token)
            sync(self.lm.device)
            dt = time.perf_counter() - t0
            if token in stops:
                break
            m.step_seconds.append(dt)
            m.decode_seconds += dt
            m.generated_tokens += 1
            yield token
        m.peak_memory_bytes = max(m.peak_memory_bytes, peak_memory_bytes(self.lm.device))

    def stream_text(self, state: State, max_new_tokens: int, sampling: SamplingParams | None = None,
                    stop_ids: Sequence[int] | None = None) -> Iterator[str]:
        """Yield generated text piece by piece."""
        decoder = IncrementalDecoder(self.lm.tokenizer)
        for token in self.generate(state, max_new_tokens, sampling, stop_ids):
            piece = decoder.push(token)
            if piece:
                yield piece

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
