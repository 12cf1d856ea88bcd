"""SnapKV: score the prompt by the attention of its last tokens (the observation window), pooled.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
https://arxiv.org/abs/2404.14469.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import ConfigError, register_transform
from .policy import FORCE_KEEP, KVPolicy, ScoreContext, pool1d


@register_transform("snapkv")
@dataclass
class SnapKV(KVPolicy):
    """Attention of the last ``window_size`` prompt queries, averaged over the window and each KV
    head's query group, smoothed by average pooling; the window itself is always kept. Costs one
    ``window_size x prompt`` attention per layer at prefill. Lossy.

    - ``window_size``: observation window (the paper uses 32); the prompt must be at least this long.
    - ``kernel_size``: odd pooling width that keeps neighbours of important tokens (the paper: 7).
    """

    window_size: int = 32
    kernel_size: int = 7

    @property
    def query_tokens(self) -> int:  # type: ignore[override]
        return self.window_size

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1:
            raise ConfigError(
                f"{type(self).__name__}.window_size must be >= 1, got {self.window_size}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(
                f"{type(self).__name__}.kernel_size must be odd and >= 1, got {self.kernel_size}"
            )

    def forced_tokens(self) -> int:
        return self.window_size

    def min_prompt_tokens(self) -> int:
        return self.window_size

    def score(self, ctx: ScoreContext) -> Tensor:
        w = min(self.window_size, ctx.queries.shape[-2])
        probs = ctx.attention(last=w)  # [B, Hkv, G, w, S]
        scores = pool1d(probs.mean(dim=(2, 3)), self.kernel_size, ctx.visible)
        scores[..., -w:] += FORCE_KEEP
        return scores
