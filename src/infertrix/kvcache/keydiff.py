"""KeyDiff: keep the keys least similar to the layer's mean key direction (key diversity).

Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", https://arxiv.org/abs/2504.15364.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register_transform
from .context import ScoreContext
from .policy import KVPolicy


@register_transform("keydiff")
@dataclass
class KeyDiff(KVPolicy):
    """Scores each key by its negative cosine similarity to the anchor, the mean of the head's
    unit-normalised keys: keys pointing away from the crowd are the distinctive ones attention
    singles out. Needs no queries or attention scores, so it works with any attention kernel. Pads
    are left out of the anchor, so a padded row scores as it would alone. Lossy."""
    use_when = "any attention kernel (no queries needed): keeps diverse keys rather than low-norm ones"

    def score(self, ctx: ScoreContext) -> Tensor:
        unit = torch.nn.functional.normalize(ctx.keys.float(), dim=-1)  # [B, H, S, D]
        if ctx.visible is None:
            anchor = unit.mean(dim=-2, keepdim=True)
        else:
            vis = ctx.visible[:, None, :, None].to(unit.dtype)
            anchor = (unit * vis).sum(dim=-2, keepdim=True) / vis.sum(dim=-2, keepdim=True).clamp_min(1)
        anchor = torch.nn.functional.normalize(anchor, dim=-1)
        return -(unit * anchor).sum(dim=-1)
