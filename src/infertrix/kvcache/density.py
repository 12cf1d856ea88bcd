"""Layer budgets from each layer's attention density (D2O / ZigZagKV style), with SnapKV scores.

Wan et al. 2024, "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of
Large Language Models", https://arxiv.org/abs/2406.13035, give layers whose attention is spread over
many tokens more cache than layers that attend to a few; Zhong et al. 2024, "ZigZagKV: Dynamic KV
Cache Compression for Long-context Modeling based on Layer Uncertainty",
https://arxiv.org/abs/2412.09036, measure it as the number of tokens that hold a given share of a
layer's attention and allocate the budget in proportion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..core import ConfigError, register_transform
from .context import FORCE_KEEP, ScoreContext, over_budget
from .snapkv import SnapKV


def tokens_for_mass(scores: Tensor, mass: float) -> list[float]:
    """Each row's mean over heads of the fewest tokens whose [B, H, S] scores hold ``mass`` of the total."""
    p = scores.float().clamp_min(0).sort(dim=-1, descending=True).values
    total = p.cumsum(-1)  # in order, so a row's trailing zeros (pads) leave its sums' bits as alone
    share = total / total[..., -1:].clamp_min(1e-30)
    return ((share < mass).sum(-1) + 1).float().mean(-1).tolist()


def allocate(weights: list[float], total: int, low: int, high: int) -> list[int]:
    """Integer budgets in [low, high] that sum to ``total`` (clipped to [n*low, n*high]), the part
    above ``low`` shared in proportion to ``weights``; layers that reach ``high`` pass their excess on."""
    n = len(weights)
    total = min(max(total, n * low), n * high)
    budgets = [low] * n
    free = list(range(n))
    rest = total - n * low
    while rest > 0 and free:
        wsum = sum(weights[i] for i in free)
        share = {i: rest * (weights[i] / wsum if wsum > 0 else 1 / len(free)) for i in free}
        capped = [i for i in free if budgets[i] + share[i] >= high]
        if capped:
            for i in capped:
                rest -= high - budgets[i]
                budgets[i] = high
            free = [i for i in free if i not in capped]
            continue
        whole = {i: math.floor(share[i]) for i in free}
        for i in free:
            budgets[i] += whole[i]
        left = rest - sum(whole.values())  # hand out what rounding down left, largest remainders first
        for i in sorted(free, key=lambda i: share[i] - whole[i], reverse=True)[:left]:
            budgets[i] += 1
        rest = 0
    return budgets


@register_transform("densitykv", "layer-density")
@dataclass
class DensityKV(SnapKV):
    """SnapKV's scores and total budget (the uniform budget times the number of layers), spread over
    the full-attention layers in proportion to their attention density: how many tokens hold ``mass``
    of the observation window's pooled attention (averaged over rows and KV heads). Every layer keeps at
    least ``min_ratio`` of the average budget (and the window). Lossy.

    The budgets need every layer's density, so each layer is scored right after its attention and all
    are compressed after the last layer of the forward: the prefill's peak memory is then the full
    cache's (as with no policy). Layers hold different lengths (like PyramidKV); each row's budgets
    follow its own densities and length, so a padded row keeps what it keeps alone.

    - ``mass``: share of the attention the density counts tokens for (ZigZagKV uses 0.9).
    - ``min_ratio``: floor of a layer's budget as a fraction of the average budget.
    """
    use_when = "layers that differ in how much context they need: SnapKV's total budget spread over layers by attention density"

    mass: float = 0.9
    min_ratio: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mass <= 1.0:
            raise ConfigError(f"DensityKV.mass must be in (0, 1], got {self.mass}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"DensityKV.min_ratio must be in [0, 1], got {self.min_ratio}")

    def compress_layer(self, ctx: ScoreContext) -> None:
        scores, w = self.window_scores(ctx)
        # pads next to a row's first tokens get pooled scores: not the row's attention
        own = scores if ctx.visible is None else scores.masked_fill(~ctx.visible[:, None, :], 0.0)
        density = tokens_for_mass(own, self.mass)
        scores[..., -w:] += FORCE_KEEP
        ctx.state.pending = (scores, ctx.visible, density)
        if ctx.layer_rank == ctx.num_layers - 1:
            self.compress_all(ctx.cache)

    def compress_all(self, cache) -> None:
        """Allocate each row's budgets over the layers scored in this forward (on its own densities and
        length, as alone), then compress each of them."""
        todo = [(r, lay, st) for r, (lay, st) in enumerate(zip(cache.evicting_layers, cache.states, strict=True))
                if st.pending is not None]
        if not todo:
            return
        per_layer = [self.row_targets(cache, r) for r, _, _ in todo]  # [L][B] uniform targets, counted
        targets = [[] for _ in todo]
        for b, seen in enumerate(cache.row_seen(cache.evicting_indices[todo[0][0]])):
            avg = per_layer[0][b]
            low = min(seen, max(self.window_size, math.ceil(self.min_ratio * avg), 1))
            row = allocate([st.pending[2][b] for _, _, st in todo], avg * len(todo), low, seen)
            for i, t in enumerate(row):
                targets[i].append(t)
        for (_, lay, st), target in zip(todo, targets, strict=True):
            scores, visible, _ = st.pending
            st.pending = None
            if over_budget(target, lay.stored_length, visible):
                self.evict(lay, st, scores, target, visible)
            else:
                st.steps_since_compress = 0  # the next check is decode_interval away, whatever the other rows
                if self.decode_interval == 0:
                    st.queries = None
            lay.flush()  # KIVI: quantize what is kept (held back while the compression was pending)
