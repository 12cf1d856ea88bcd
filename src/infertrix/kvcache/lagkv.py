"""LagKV: score each chunk's tokens by how much their keys and values stand out against the next chunk.

Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
Important", https://arxiv.org/abs/2504.04704.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .context import FORCE_KEEP, ScoreContext
from .policy import KVPolicy


@register_transform("lagkv")
@dataclass
class LagKV(KVPolicy):
    """After ``sink_tokens`` first tokens, the row is cut into chunks of ``lag_size``; each chunk is
    min-max normalised per channel by the statistics of the chunk after it (its "lag" reference), and
    a token scores the softmax, over its chunk, of its normalised key's spread across channels plus
    the same for its value. The sinks and the tokens with no complete reference chunk after them
    (the last ``lag_size`` to ``2 * lag_size - 1``) are always kept. Needs no queries or attention
    scores. Chunks start at each row's first real token, so a padded row scores as alone. Lossy.

    - ``sink_tokens``: first tokens always kept (the paper: 16).
    - ``lag_size``: chunk length (the paper: 128; the budget must hold ``sink_tokens + 2 * lag_size - 1``).
    """
    use_when = "any attention kernel (no queries needed), long prompts: a query-free alternative to SnapKV"

    sink_tokens: int = 16
    lag_size: int = 128

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ConfigError(f"LagKV.sink_tokens must be an int >= 0, got {self.sink_tokens!r}")
        if not isinstance(self.lag_size, int) or self.lag_size < 2:
            raise ConfigError(f"LagKV.lag_size must be an int >= 2, got {self.lag_size!r}")

    def fixed_part(self) -> tuple[int, str, str]:
        kept = self.sink_tokens + 2 * self.lag_size - 1
        return kept, f"sink_tokens={self.sink_tokens} and up to 2 * lag_size - 1 recent tokens", "a smaller lag_size"

    def score(self, ctx: ScoreContext) -> Tensor:
        b, h, s, _ = ctx.keys.shape
        dev = ctx.keys.device
        start = (~ctx.visible).sum(-1) if ctx.visible is not None else torch.zeros(b, dtype=torch.long, device=dev)
        rel = torch.arange(s, device=dev)[None, :] - start[:, None] - self.sink_tokens  # [B, S]
        chunk = rel.div(self.lag_size, rounding_mode="floor")
        real = s - start  # tokens per row
        scored = (rel >= 0) & (self.sink_tokens + (chunk + 2) * self.lag_size <= real[:, None])
        n = s // self.lag_size + 1  # chunk ids 0..n-1; id n collects sinks and pads
        idx = torch.where(rel >= 0, chunk, n).clamp(max=n)[:, None, :].expand(b, h, s)
        out = self._spread(ctx.keys, idx, n) + self._spread(ctx.values, idx, n)
        return torch.where(scored[:, None, :], out, torch.full_like(out, FORCE_KEEP))

    def _spread(self, x: Tensor, idx: Tensor, n: int) -> Tensor:
        """[B, H, S] softmax over each chunk of the channel spread of ``x`` normalised by the next chunk."""
        x = x.float()
        d = x.shape[-1]
        at = idx[..., None].expand(*idx.shape, d)
        init = x.new_zeros(*idx.shape[:2], n + 1, d)
        low = init.scatter_reduce(2, at, x, "amin", include_self=False)
        high = init.scatter_reduce(2, at, x, "amax", include_self=False)
        ref = (idx + 1).clamp(max=n)[..., None].expand_as(at)  # the lag reference: the next chunk
        lo, hi = low.gather(2, ref), high.gather(2, ref)
        spread = ((x - lo) / (hi - lo).clamp_min(1e-6)).std(dim=-1)  # [B, H, S]
        top = spread.new_full(init.shape[:3], float("-inf")).scatter_reduce(2, idx, spread, "amax")
        e = (spread - top.gather(2, idx)).exp()
        return e / e.new_zeros(init.shape[:3]).scatter_add(2, idx, e).gather(2, idx)
