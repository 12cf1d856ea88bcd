"""``ObservationWindowPolicy``: the observation-window scoring shared by SnapKV, PyramidKV and R-KV.

SnapKV (Li et al. 2024, https://arxiv.org/abs/2404.14469) scores each stored token by the attention
the last ``window_size`` queries pay it, averaged over the window and each KV head's query group and
smoothed by average pooling; the window itself is always kept. R-KV reuses the same scores as its
importance term, PyramidKV with other per-layer budgets. They all subclass this base.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import ConfigError
from .attention import pool1d
from .context import ScoreContext
from .policy import KVPolicy


@dataclass
class ObservationWindowPolicy(KVPolicy):
    """Base (not registered): the window's queries are buffered and always kept.

    - ``window_size``: observation window (the paper uses 32), always kept: a prompt of fewer than
      ``window_size / (1 - compression)`` tokens keeps the window (the whole prompt when shorter), more than
      its budget, and ``describe()`` counts it under ``kept_more_than_budget``.
    - ``kernel_size``: odd pooling width that keeps neighbours of important tokens (the paper: 7).
    """

    window_size: int = 32
    kernel_size: int = 7

    def score_queries(self) -> int:
        return self.window_size

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.window_size < 1:
            raise ConfigError(f"{name}.window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"{name}.kernel_size must be odd and >= 1, got {self.kernel_size}")

    def fixed_part(self) -> tuple[int, str, str]:
        # a prompt shorter than the window is its own window: kept whole
        return self.window_size, f"the observation window, window_size={self.window_size}", "a smaller window_size"

    def window_scores(self, ctx: ScoreContext) -> tuple[Tensor, int]:
        """([B, H_kv, S] pooled mean attention of the last ``w`` queries, ``w``); the window's own
        ``w`` slots are the last ones, for the caller to force-keep."""
        w = min(self.window_size, ctx.queries.shape[-2])
        probs = ctx.attention(last=w)  # [B, Hkv, G, w, S]
        return pool1d(probs.mean(dim=(2, 3)), self.kernel_size, ctx.visible), w
