"""H2O: heavy hitters (largest accumulated attention) plus a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", https://arxiv.org/abs/2306.14048.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .attention import attention_probs
from .context import ScoreContext, keep_recent
from .policy import KVPolicy

QUERY_CHUNK = 512  # queries per attention block while accumulating (bounds the prefill's memory)


@register_transform("h2o")
@dataclass
class H2O(KVPolicy):
    """Each stored token's attention summed over every query so far (all prompt queries, then each
    decoded token); keep the ``recent_ratio`` most recent part of the budget and fill the rest with
    the heaviest hitters. Per KV head (summed over its query group). Costs a full ``prompt x prompt``
    attention per layer at prefill (done in blocks) and one query per step while decoding. Lossy.

    - ``recent_ratio``: share of the budget given to the most recent tokens (the paper: 0.5).
    - ``observation_window``: None accumulates over every prompt query (the paper); a number only
      over the last that many prompt queries (cheaper prefill on long prompts).
    """
    use_when = "long generations whose important tokens change as decoding goes: accumulated attention"

    recent_ratio: float = 0.5
    observation_window: int | None = None

    def observed_queries(self) -> int:
        return -1 if self.observation_window is None else self.observation_window

    def validate(self) -> None:
        super().validate()
        if self.observation_window is not None and self.observation_window < 1:
            raise ConfigError(f"{type(self).__name__}.observation_window must be >= 1 or None")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ConfigError(
                f"{type(self).__name__}.recent_ratio must be in [0, 1], got {self.recent_ratio}"
            )

    def observe(self, ctx: ScoreContext, new_queries: Tensor | None) -> None:
        acc = ctx.state.aux.get("h2o")
        b, h, s, _ = ctx.keys.shape
        if acc is None or acc.shape[-1] != s:
            acc = torch.zeros(b, h, s, dtype=torch.float32, device=ctx.keys.device)
        n = new_queries.shape[-2]
        if ctx.probs is not None:  # an engine forward: its attention, summed in a fixed order
            acc += query_group_sum(ctx.probs[:, :, -n:], h)
            ctx.state.aux["h2o"] = acc
            return
        for start in range(0, n, QUERY_CHUNK):
            stop = min(n, start + QUERY_CHUNK)
            q = new_queries[:, :, start:stop]
            # the block's queries own slots s - n + start ... s - n + stop - 1; later keys are masked
            probs = attention_probs(q, ctx.upto(s - n + stop))
            acc[..., : s - n + stop] += probs.sum(dim=(2, 3))
        ctx.state.aux["h2o"] = acc

    def score(self, ctx: ScoreContext) -> Tensor:
        scores = ctx.state.aux["h2o"].clone()
        return keep_recent(scores, self.recent_ratio, ctx.target)


def query_group_sum(probs: Tensor, kv_heads: int) -> Tensor:
    """[B, H_kv, S]: attention probabilities [B, H_q, n, S] summed over each KV head's query heads
    and the n queries, as one elementwise add after another (heads, then queries, in order), so a
    row's sum has the same bits in any batch."""
    p = probs.unflatten(1, (kv_heads, -1))  # [B, H_kv, G, n, S]
    per_query = p[:, :, 0]
    for i in range(1, p.shape[2]):
        per_query = per_query + p[:, :, i]
    total = per_query[:, :, 0]
    for t in range(1, per_query.shape[2]):
        total = total + per_query[:, :, t]
    return total
