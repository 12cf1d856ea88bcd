"""Keyformer: keep a recent window plus "key tokens" scored with Gumbel-noise-regularised attention.

Adnan et al. 2024, "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient
Generative Inference", https://arxiv.org/abs/2403.09054.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .policy import FORCE_KEEP, KVPolicy, ScoreContext


@register_transform("keyformer")
@dataclass
class Keyformer(KVPolicy):
    """Scores are ``softmax((logits + Gumbel noise) / temperature)`` of the last ``window_size``
    queries, summed over them and averaged over each KV head's query group; the most recent
    ``recent_ratio`` of the budget is always kept. The noise (seeded, so runs repeat) compensates for
    the tokens already dropped. Lossy.

    - ``window_size``: queries whose attention is scored.
    - ``recent_ratio``: share of the budget kept as the recent window (the paper: 0.2-0.3).
    - ``temperature``: softmax temperature of the regularised scores (the paper anneals 1 -> 2).
    - ``seed``: seed of the Gumbel noise.
    """

    window_size: int = 32
    recent_ratio: float = 0.25
    temperature: float = 1.0
    seed: int = 0

    @property
    def query_tokens(self) -> int:  # type: ignore[override]
        return self.window_size

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1 or not 0.0 <= self.recent_ratio <= 1.0 or self.temperature <= 0:
            raise ConfigError(
                "Keyformer needs window_size >= 1, recent_ratio in [0, 1] and temperature > 0, got "
                f"{self.window_size}, {self.recent_ratio}, {self.temperature}"
            )

    def score(self, ctx: ScoreContext) -> Tensor:
        gen = torch.Generator(device=ctx.keys.device).manual_seed(self.seed + ctx.layer_rank)

        def gumbel(logits: Tensor) -> Tensor:
            u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-10, 1 - 1e-10)
            return (logits - torch.log(-torch.log(u))) / self.temperature

        w = min(self.window_size, ctx.queries.shape[-2])
        scores = ctx.attention(last=w, logits_fn=gumbel).sum(dim=3).mean(dim=2)
        recent = int(self.recent_ratio * ctx.target)
        if recent:
            scores[..., -recent:] += FORCE_KEEP
        return scores
