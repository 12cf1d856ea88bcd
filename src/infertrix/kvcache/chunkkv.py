"""ChunkKV: keep whole fixed-size chunks of tokens, ranked by their summed SnapKV scores.

Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", https://arxiv.org/abs/2502.00299.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .context import FORCE_KEEP, ScoreContext
from .window import ObservationWindowPolicy


@register_transform("chunkkv")
@dataclass
class ChunkKV(ObservationWindowPolicy):
    """Scores tokens with SnapKV's observation window, sums them over chunks of ``chunk_size``
    consecutive tokens and keeps the best chunks whole (only the last chunk that fits the budget is
    cut, keeping its first tokens), so kept tokens keep their neighbours: phrases rather than
    scattered words. Chunks start at each row's first real token, so a padded row keeps the same
    chunks as alone; the window is always kept. Lossy.

    - ``chunk_size``: tokens per chunk (the paper: 10; kvpress's ChunkKVPress: 20).
    - ``shared_heads``: rank chunks by their scores summed over the layer's KV heads, so every head
      keeps the same chunks (as kvpress's ChunkKVPress selects); False ranks them per KV head.
    """
    use_when = "as SnapKV, when kept tokens should stay whole phrases (extraction, code, multi-hop QA)"

    chunk_size: int = 10
    shared_heads: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"ChunkKV.chunk_size must be an int >= 1, got {self.chunk_size!r}")

    def score(self, ctx: ScoreContext) -> Tensor:
        scores, w = self.window_scores(ctx)  # [B, H, S]
        b, h, s = scores.shape
        if self.shared_heads:
            scores = scores.sum(dim=1, keepdim=True).expand(b, h, s)
        slot = torch.arange(s, device=scores.device)
        start = torch.zeros(b, dtype=torch.long, device=scores.device)
        if ctx.visible is not None:
            start = (~ctx.visible).sum(dim=-1)  # left pads before each row's first token
            scores = scores.masked_fill(~ctx.visible[:, None, :], 0.0)
        offset = (slot[None, :] - start[:, None]).clamp_min(0)  # [B, S] position within the row
        chunk = (offset // self.chunk_size)[:, None, :].expand(b, h, s)
        totals = scores.new_zeros(b, h, s).scatter_add_(-1, chunk, scores)  # [B, H, chunks<=S]
        # rank chunks (0 = best, ties to the earlier chunk) and order tokens by (rank, position in
        # chunk) as exact small integers, so a cut chunk keeps its first tokens, never arbitrary ones
        order = totals.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, slot.expand(b, h, s))
        within = (offset % self.chunk_size)[:, None, :]
        out = -(rank.gather(-1, chunk) * self.chunk_size + within).float()
        out[..., -w:] += FORCE_KEEP
        return out
