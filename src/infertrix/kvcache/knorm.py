"""KNorm: keep the keys with the lowest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
https://arxiv.org/abs/2406.11430.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import register_transform
from .context import ScoreContext
from .policy import KVPolicy


@register_transform("knorm")
@dataclass
class KNorm(KVPolicy):
    """Low key norm correlates with high attention; scores need no queries, so it works with any
    attention implementation detail and costs one norm per key. Lossy."""
    use_when = "any attention kernel (no queries needed): the cheapest content-aware eviction"

    def score(self, ctx: ScoreContext) -> Tensor:
        return -ctx.keys.float().norm(dim=-1)
