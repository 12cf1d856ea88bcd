"""TOVA: evict the token the current query attends least (token omission via attention).

Oren et al. 2024, "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import register_transform
from .context import ScoreContext
from .policy import KVPolicy


@register_transform("tova")
@dataclass
class TOVA(KVPolicy):
    """Keep the tokens the last query attends most, averaged over heads (the paper averages all
    heads of a layer, so every KV head keeps the same tokens; ``head_average=False`` keeps per KV
    head). A decode-time policy: with ``decode_interval=1`` it evicts at every step like the paper.
    Costs one query's attention per layer and step. Lossy.
    """
    use_when = "high compression: keeps the tokens the newest query attends to most"

    head_average: bool = True

    def score_queries(self) -> int:
        return 1

    def score(self, ctx: ScoreContext) -> Tensor:
        probs = ctx.attention(last=1)  # [B, Hkv, G, 1, S]
        scores = probs.mean(dim=(2, 3))
        if self.head_average:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        return scores
