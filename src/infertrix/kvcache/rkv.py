"""R-KV: importance minus redundancy, for long (reasoning) generations.

Cai et al. 2025, "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models",
https://arxiv.org/abs/2505.24133.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .context import FORCE_KEEP, ScoreContext
from .window import ObservationWindowPolicy


@register_transform("rkv", "r-kv")
@dataclass
class RKV(ObservationWindowPolicy):
    """Score = ``lam * importance - (1 - lam) * redundancy``: importance is the pooled attention of
    the last ``window_size`` queries (as SnapKV), redundancy each key's mean cosine similarity to the
    other stored keys, softmax-normalised over the sequence. Redundant tokens of long generations go
    first. Meant for decoding (set ``decode_interval``, e.g. 128); costs an ``S x S`` key similarity
    per layer at each compression. Lossy.

    - ``window_size``: observation window; always kept.
    - ``kernel_size``: pooling width of the importance scores.
    - ``lam``: weight of importance against redundancy (the paper: 0.1).
    """
    use_when = "long, repetitive outputs (reasoning traces): importance minus redundancy"

    lam: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"RKV.lam must be in [0, 1], got {self.lam}")

    def score(self, ctx: ScoreContext) -> Tensor:
        importance, w = self.window_scores(ctx)
        kn = torch.nn.functional.normalize(ctx.keys.float(), dim=-1)
        redundancy = torch.zeros_like(importance)
        first = [0] * kn.shape[0] if ctx.visible is None else (~ctx.visible).sum(-1).tolist()
        for b, f in enumerate(first):  # each row over its own tokens (after its pads and fillers), as alone
            own = kn[b : b + 1, :, f:]
            sim = torch.matmul(own, own.transpose(-1, -2))  # [1, H, n, n]
            sim.diagonal(dim1=-2, dim2=-1).zero_()
            redundancy[b : b + 1, :, f:] = torch.softmax(sim.sum(-1) / max(own.shape[-2] - 1, 1), dim=-1)
        scores = self.lam * importance - (1 - self.lam) * redundancy
        scores[..., -w:] += FORCE_KEEP
        return scores
