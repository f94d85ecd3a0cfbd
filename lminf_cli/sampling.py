"""Turning next-token logits into a token: the sampling settings and the sampler they make."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SettingsError

Sampler = Callable[[Tensor], int]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters (validated once, here)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # written so that nan fails too
            raise SettingsError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SettingsError("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SettingsError("top_p", f"must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether the sampler is a plain argmax."""
        return self.temperature == 0


def make_sampler(params: SamplingParams, device: torch.device) -> Sampler:
    """One callable logits [V] -> token id under `params` (its own seeded generator)."""
    if params.greedy:
        return lambda logits: int(torch.argmax(logits))
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def sample(logits: Tensor) -> int:
        scores = logits.float() / params.temperature  # [V]
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, -1)
            drop = probs.cumsum(-1) - probs > params.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))

    return sample
