"""Uniform layer skipping: drop evenly spaced middle layers, no calibration."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.model import decoder_layers
from ..core.registry import register_transform
from ..core.transform import ConfigError
from .plan import SkipEntry, SkipPlan
from .strategy import SkipStrategy, skippable, units_for_budget


@register_transform("uniform_skip", "uniform")
@dataclass
class UniformSkip(SkipStrategy):
    """Skip evenly spread middle decoder layers (lossy, no calibration, saves their compute and KV).

    After "Accelerating Inference in Large Language Models with a Unified Layer Skipping Strategy"
    (Liu et al., 2024, https://arxiv.org/abs/2404.06954): the layers to skip are chosen only by
    the target rate and spread uniformly over the depth, keeping the bottom and top layers, so
    the result is input-independent and batch-friendly. Each entry's score is its relative depth.

    fraction / count: share of decoder compute (= of layers) to skip, or the number of layers.
    keep_first: bottom layers never skipped (at least 1: layer 0 anchors the KV cache).
    keep_last: top layers never skipped.
    """
    use_when = "a quick lossy speed-up with no calibration data, on tasks that tolerate a large quality loss"

    keep_first: int = 1
    keep_last: int = 1

    def validate(self) -> None:
        super().validate()
        if self.keep_first < 1 or self.keep_last < 0:
            raise ConfigError(
                f"UniformSkip: keep_first must be >= 1 (layer 0 anchors the KV cache) and keep_last >= 0, "
                f"got {self.keep_first} and {self.keep_last}"
            )

    def plan(self, model: nn.Module) -> SkipPlan:
        n = len(decoder_layers(model))
        allowed = set(skippable(model, "layer", protect_last=False))
        cands = [i for i in range(self.keep_first, n - self.keep_last) if i in allowed]
        k = units_for_budget(model, "layer", self.fraction, self.count, len(cands), "UniformSkip")
        # k evenly spaced picks, centred in their strata of the candidate range
        picks = sorted({cands[int((j + 0.5) * len(cands) / k)] for j in range(k)}) if k else []
        entries = [SkipEntry(i, "layer", round(i / max(n - 1, 1), 4)) for i in picks]
        return SkipPlan(entries, "uniform", n, {"fraction": self.fraction, "count": k})
