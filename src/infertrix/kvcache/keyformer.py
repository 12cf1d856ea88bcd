"""Keyformer: keep a recent window plus "key tokens" scored with Gumbel-noise-regularised attention.

Adnan et al. 2024, "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient
Generative Inference", https://arxiv.org/abs/2403.09054.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .context import ScoreContext, keep_recent
from .policy import KVPolicy


@register_transform("keyformer")
@dataclass
class Keyformer(KVPolicy):
    """Scores are ``softmax((logits + Gumbel noise) / temperature)`` of the last ``window_size``
    queries, summed over them and averaged over each KV head's query group; the most recent
    ``recent_ratio`` of the budget is always kept. The noise (a seeded hash of head and positions, so runs repeat and
    a padded row matches the row alone) compensates for
    the tokens already dropped. Lossy.

    - ``window_size``: queries whose attention is scored.
    - ``recent_ratio``: share of the budget kept as the recent window (the paper: 0.2-0.3).
    - ``temperature``: softmax temperature of the regularised scores (the paper anneals 1 -> 2).
    - ``seed``: seed of the Gumbel noise.
    """
    use_when = "as TOVA/H2O with noise-regularised scores that spread the budget over more key tokens"

    window_size: int = 32
    recent_ratio: float = 0.25
    temperature: float = 1.0
    seed: int = 0

    def score_queries(self) -> int:
        return self.window_size

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1 or not 0.0 <= self.recent_ratio <= 1.0 or self.temperature <= 0:
            raise ConfigError(
                "Keyformer needs window_size >= 1, recent_ratio in [0, 1] and temperature > 0, got "
                f"{self.window_size}, {self.recent_ratio}, {self.temperature}"
            )

    def score(self, ctx: ScoreContext) -> Tensor:
        layer_seed = self.seed * 1000 + ctx.layer_rank

        def gumbel(logits: Tensor) -> Tensor:
            u = position_noise(logits.shape, layer_seed, logits.device)
            return (logits - torch.log(-torch.log(u))) / self.temperature

        w = min(self.window_size, ctx.queries.shape[-2])
        scores = ctx.attention(last=w, logits_fn=gumbel).sum(dim=3).mean(dim=2)
        return keep_recent(scores, self.recent_ratio, ctx.target)


def position_noise(shape: torch.Size, seed: int, device) -> Tensor:
    """Uniform (0, 1) noise for [B, H, G, w, S] logits that depends only on (seed, head, query and key
    positions counted from the end), not on the batch: a left-padded row gets the same noise as alone."""
    _, h, g, w, s = shape
    idx = [torch.arange(n, device=device, dtype=torch.float64) for n in (h, g, w, s)]
    hh, gg, ww, ss = (
        t.view(*(n if k == i else 1 for k, n in enumerate((h, g, w, s)))) for i, t in enumerate(idx)
    )
    x = (s - 1 - ss) * 12.9898 + (w - 1 - ww) * 78.233 + (hh * g + gg) * 37.719 + seed * 4.581
    u = torch.frac(torch.sin(x) * 43758.5453123).abs().clamp(1e-6, 1 - 1e-6)
    return u.to(torch.float32).unsqueeze(0)
