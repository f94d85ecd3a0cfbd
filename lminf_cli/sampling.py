"""Turning next-token logits into a token: the sampling settings and the sampler they make.

The sampler is transformers' own logits processors (repetition penalty, temperature,
top-k, top-p, min-p), assembled in the order `generate()` applies them, so a setting
means here what it means there.  What lminf adds is the token history: a repetition
penalty looks back on the last `repeat_last_n` tokens (prompt and reply), kept in a
small ring on the logits' device.  The sampled token is written into that ring on the
device before its id is read back, so the read-back that every step needs anyway stays
the only host synchronisation of a step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SettingsError

if TYPE_CHECKING:  # torch is imported when a sampler is made: the CLI reads the settings' defaults without it
    import torch
    from torch import Tensor

# A repetition penalty's window is kept per state (the last tokens encoded or generated);
# this bounds it, so a state stays constant-size however long it gets.
MAX_REPEAT_LAST_N = 4096


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen (validated once, here).

    temperature 0 is greedy decoding: the argmax of the logits, which a repetition penalty
    (when not 1) adjusts first, as in generate(do_sample=False).  top_k 0, top_p 1 and
    min_p 0 disable those filters; repeat_penalty 1 or repeat_last_n 0 disable the penalty.
    `stop`: texts that end a reply when it produces them (not included in it).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # written so that nan fails too
            raise SettingsError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SettingsError("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SettingsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SettingsError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not (self.repeat_penalty > 0 and math.isfinite(self.repeat_penalty)):
            raise SettingsError("repeat_penalty", f"must be > 0 (1 = off), got {self.repeat_penalty}")
        if not 0 <= self.repeat_last_n <= MAX_REPEAT_LAST_N:
            raise SettingsError("repeat_last_n", f"must be in [0, {MAX_REPEAT_LAST_N}] (0 = off), "
                                                 f"got {self.repeat_last_n}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise SettingsError("seed", f"must be in [0, 2^63), got {self.seed}")
        if isinstance(self.stop, str):  # one text, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise SettingsError("stop", "must not be empty")

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (of the penalized logits, if penalized)."""
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition penalty applies."""
        return self.repeat_penalty != 1.0 and self.repeat_last_n > 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, given: Mapping[str, Any]) -> SamplingParams:
        """These defaults with the settings a user gave (None: not given) on top.

        An explicit temperature 0 asks for greedy decoding: a penalty that is only a
        default is then dropped, so `--temperature 0` alone is the plain argmax of the
        model's logits; a penalty given with it still applies, as in generate().
        """
        given = {k: v for k, v in given.items() if v is not None}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        out = self.replace(**given)
        if given.get("temperature") == 0 and "repeat_penalty" not in given:
            out = out.replace(repeat_penalty=1.0)
        return out


# What `lminf continue` samples with when the model ships no generation defaults (measured on
# Macbeth: docs/usage.md, "Generation defaults"): greedy decoding loops there, sampling alone
# still repeats lines, a mild penalty over the last 64 tokens does not.
CONTINUE_DEFAULTS = SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                                   repeat_last_n=64)
# Answers (ask, summarize, chat) stay greedy, so the same question gives the same answer; the
# same mild penalty keeps them from repeating sentences (measured on three documents, ibid.).
ANSWER_DEFAULTS = SamplingParams(repeat_penalty=1.1, repeat_last_n=64)

# generate()'s own defaults for what a generation_config leaves unset.
_GENERATE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
_SAMPLING_KEYS = ("do_sample", *_GENERATE_DEFAULTS)


def model_defaults(generation_config: Any, task: str = "continue") -> SamplingParams:
    """The defaults of a task on a model: its own generation_config where it ships sampling values, else lminf's.

    As generate() reads them: values the model leaves unset take generate()'s defaults
    (temperature 1, top-k 50), and without do_sample the reply is greedy.  `task`
    "continue" takes all of them; "answer" (ask, summarize, chat) stays greedy and takes
    only the model's repetition penalty.
    """
    base = CONTINUE_DEFAULTS if task == "continue" else ANSWER_DEFAULTS
    shipped = _shipped(generation_config)
    if not shipped:
        return base
    values = {**_GENERATE_DEFAULTS, **{k: v for k, v in shipped.items() if k != "do_sample"}}
    penalty = float(values["repetition_penalty"])
    if task != "continue":
        return base.replace(repeat_penalty=penalty) if "repetition_penalty" in shipped else base
    sample = bool(shipped.get("do_sample", False))
    return base.replace(temperature=float(values["temperature"]) if sample else 0.0,
                        top_k=int(values["top_k"] or 0), top_p=float(values["top_p"]),
                        min_p=float(values["min_p"] or 0.0), repeat_penalty=penalty)


def _shipped(generation_config: Any) -> dict[str, Any]:
    """The sampling values a generation_config sets itself (not the library's defaults)."""
    if generation_config is None:
        return {}
    try:
        # to_diff_dict: only what differs from a blank GenerationConfig, so library defaults
        # (transformers 4 fills temperature=1.0 in every config) do not count as shipped.
        values = generation_config.to_diff_dict()
    except AttributeError:
        values = dict(vars(generation_config))
    return {k: values[k] for k in _SAMPLING_KEYS if values.get(k) is not None}


class Sampler:
    """logits [V] -> the next token id under SamplingParams, with a seeded generator of its own.

    `history`: the ids before the first sampled token (the prompt's end); the sampler adds
    each token it samples, so a repetition penalty sees the last `repeat_last_n` of both.
    """

    def __init__(self, params: SamplingParams, device: torch.device, history: Sequence[int] = ()) -> None:
        import torch
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params, self.device = params, torch.device(device)
        processors: list[Any] = []
        # generate()'s order: processors (the penalty) first, then the warpers that only apply
        # when sampling: temperature, top-k, top-p, min-p (min-p after temperature, as there).
        if params.penalized:
            processors.append(RepetitionPenaltyLogitsProcessor(float(params.repeat_penalty)))
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                processors.append(TopKLogitsWarper(int(params.top_k)))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(float(params.top_p)))
            if params.min_p > 0.0:
                processors.append(MinPLogitsWarper(float(params.min_p)))
        self.processors = LogitsProcessorList(processors)
        # The penalty's window: a ring of ids on the logits' device.  The order of ids does not
        # matter to a penalty (a set of tokens), so a ring needs no shifting.
        n = params.repeat_last_n if params.penalized else 0
        self.window = torch.zeros((1, n), dtype=torch.long, device=self.device)  # [1, n]
        self.filled = 0  # slots in use; counted on the host, so slicing never reads the device
        self.next_slot = 0
        recent = list(history)[-n:] if n else []
        if recent:
            self.window[0, :len(recent)] = torch.tensor(recent, dtype=torch.long)
            self.filled, self.next_slot = len(recent), len(recent) % n
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def scores(self, logits: Tensor) -> Tensor:
        """The processed scores [1, V] a token is drawn from (argmax'ed when greedy)."""
        scores = logits.reshape(1, -1).float()
        if not self.processors:
            return scores
        return self.processors(self.window[:, :self.filled], scores)

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution [V] the next token is drawn from (one-hot when greedy)."""
        import torch

        scores = self.scores(logits)[0]
        if self.params.greedy:
            return torch.nn.functional.one_hot(scores.argmax(), scores.numel()).float()
        return torch.softmax(scores, -1)

    def __call__(self, logits: Tensor) -> int:
        import torch

        scores = self.scores(logits)  # [1, V]
        if self.generator is None:
            token = scores.argmax(-1)  # [1]
        else:
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator)[0]  # [1]
        n = self.window.shape[1]
        if n:
            self.window[0, self.next_slot] = token[0]  # on the device: no read-back
            self.next_slot = (self.next_slot + 1) % n
            self.filled = min(self.filled + 1, n)
        return int(token)  # the one read-back of a step


def make_sampler(params: SamplingParams, device: torch.device, history: Sequence[int] = ()) -> Sampler:
    """One callable logits [V] -> token id under `params` (see Sampler)."""
    return Sampler(params, device, history)
