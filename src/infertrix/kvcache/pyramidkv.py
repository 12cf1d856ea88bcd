"""PyramidKV: SnapKV scoring with budgets that shrink from the lower layers to the upper ones.

Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
https://arxiv.org/abs/2406.02069.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core import ConfigError, register_transform
from .density import allocate
from .snapkv import SnapKV


@register_transform("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """The average budget is the same as SnapKV's (same total KV bytes), spread as an arithmetic
    pyramid over the full-attention layers: the top layer keeps ``average / beta`` tokens (at least
    the window), the bottom one ``2 * average - top`` (capped at the tokens seen, the excess going to
    the next layers, so the total stays ``average x layers``). Lossy.

    - ``beta``: steepness of the pyramid (the paper: 20).
    """
    use_when = "as SnapKV with the same KV bytes, more of the budget in the lower layers"

    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise ConfigError(f"PyramidKV.beta must be >= 1, got {self.beta}")

    def layer_target(self, seen: int, layer_rank: int, num_layers: int) -> int:
        avg = self.target(seen)
        if num_layers <= 1 or avg >= seen:
            return avg
        top = max(min(self.window_size, avg), math.ceil(avg / self.beta))
        bottom = 2 * avg - top
        # the pyramid above `top`; a layer that would exceed the prompt passes its excess up the pyramid,
        # so the layers always hold the uniform total (at low compression `bottom` can exceed `seen`)
        above = [(bottom - top) * (1 - r / (num_layers - 1)) for r in range(num_layers)]
        return allocate(above, avg * num_layers, min(top, seen), seen)[layer_rank]
