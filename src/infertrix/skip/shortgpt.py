"""ShortGPT: remove the layers with the lowest block influence on calibration text."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.model import decoder_layers
from ..core.registry import register_transform
from .calibrated import CalibratedStrategy
from .plan import SkipEntry, SkipPlan
from .strategy import skippable, units_for_budget


@register_transform("shortgpt", "block_influence")
@dataclass
class ShortGPT(CalibratedStrategy):
    """Skip the whole decoder layers with the lowest Block Influence (lossy; saves compute and KV).

    "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect" (Men et al.,
    2024, https://arxiv.org/abs/2403.03853): BI_i = 1 - E_tokens[cos(x_i, x_{i+1})], the hidden
    state entering and leaving layer i, measured on calibration text; the layers with the lowest
    BI change the residual stream least and are removed. One calibration pass (a few seconds on
    SmolLM2, progress bar); each entry's score is its BI.

    fraction / count: share of decoder compute (= of layers) to skip, or the number of layers.
    (calibration fields: see CalibratedStrategy)
    """
    use_when = "a few whole layers can go: calibrated on text, the lowest perplexity per share of compute skipped"

    def plan(self, model: nn.Module) -> SkipPlan:
        n = len(decoder_layers(model))
        sims = self.measure(model)
        cands = skippable(model, "layer", self.protect_last)
        k = units_for_budget(model, "layer", self.fraction, self.count, len(cands), "ShortGPT")
        bi = {i: 1.0 - sims.layer[i] for i in cands}
        chosen = sorted(cands, key=lambda i: bi[i])[:k]
        entries = [SkipEntry(i, "layer", round(bi[i], 6)) for i in chosen]
        return SkipPlan(entries, "shortgpt", n, {"fraction": self.fraction, "calibration_tokens": sims.tokens})
