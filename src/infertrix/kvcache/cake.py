"""CAKE: layer budgets from each layer's attention dispersion and shift, tokens by mean plus variance.

Qin et al. 2025, "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
https://arxiv.org/abs/2503.12491.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import ConfigError, register_transform
from .attention import pool1d
from .context import FORCE_KEEP, ScoreContext
from .density import DensityKV


def layer_preference(probs: Tensor, tau1: float, tau2: float) -> list[float]:
    """CAKE's preference of a layer from its window attention [B, H, Q, S]: the entropy of the mean over
    queries (how spread) to ``1 / tau1`` times the summed variance across queries (how it shifts) to
    ``1 / tau2``, averaged over heads, one per row."""
    mean, var = probs.mean(dim=2), probs.var(dim=2, correction=0)
    # in-order sums over the slots: a padded row's leading zeros (its pads) leave the bits of the row alone
    entropy = -(mean * mean.clamp_min(1e-30).log()).cumsum(-1)[..., -1]
    return (entropy.clamp_min(0).pow(1 / tau1) * var.cumsum(-1)[..., -1].pow(1 / tau2)).mean(-1).tolist()


@register_transform("cake")
@dataclass
class CAKE(DensityKV):
    """DensityKV's machinery (total budget of SnapKV, every layer scored, then budgets allocated and
    all layers compressed after the last one) with CAKE's layer preference: the entropy of the
    window's mean attention (spatial dispersion) to the power ``1 / tau1`` times its variance across
    the window's queries, summed over tokens (temporal shift), to the power ``1 / tau2``. A token
    scores its pooled mean attention plus ``gamma`` times its pooled variance across the window, so
    tokens some queries need strongly are kept too. As DensityKV, each row's budgets follow its own
    preferences. Lossy.

    - ``tau1``, ``tau2``: temperatures of the dispersion and shift terms (> 0; larger flattens them).
    - ``gamma``: weight of the variance in the token score (>= 0; 0 is SnapKV's score).
    """
    use_when = "as DensityKV, with layer budgets from attention entropy and its shift across queries"

    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0

    def validate(self) -> None:
        super().validate()
        if not (self.tau1 > 0 and self.tau2 > 0):
            raise ConfigError(f"CAKE.tau1 and tau2 must be > 0, got {self.tau1}, {self.tau2}")
        if self.gamma < 0:
            raise ConfigError(f"CAKE.gamma must be >= 0, got {self.gamma}")

    def compress_layer(self, ctx: ScoreContext) -> None:
        w = min(self.window_size, ctx.queries.shape[-2])
        probs = ctx.attention(last=w).flatten(2, 3)  # [B, Hkv, G*w, S]
        mean, var = probs.mean(dim=2), probs.var(dim=2, correction=0)  # [B, Hkv, S]
        scores = pool1d(mean + self.gamma * var, self.kernel_size, ctx.visible)
        scores[..., -w:] += FORCE_KEEP
        ctx.state.pending = (scores, ctx.visible, layer_preference(probs, self.tau1, self.tau2))
        if ctx.layer_rank == ctx.num_layers - 1:
            self.compress_all(ctx.cache)
