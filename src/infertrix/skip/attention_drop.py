"""Attention dropping: remove the attention sublayers that change the hidden state least."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.model import decoder_layers
from ..core.registry import register_transform
from .calibrated import CalibratedStrategy
from .plan import SkipEntry, SkipPlan
from .strategy import skippable, units_for_budget


@register_transform("attn_drop", "attention_drop")
@dataclass
class AttentionDrop(CalibratedStrategy):
    """Skip the attention sublayers with the highest input/output similarity, keep every MLP.

    "What Matters in Transformers? Not All Attention is Needed" (He et al., 2024,
    https://arxiv.org/abs/2406.15786), Attention Drop: score each attention sublayer by
    cos(X, X + Attn(LN(X))) on calibration text and drop the most similar. Lossy; saves the
    attention's weights compute and its whole KV cache (a dropped layer stores nothing).
    Attention is about a quarter of a Llama-style layer's weights, so at most ~25% of decoder
    compute can be skipped this way; a larger budget is refused with a clear error.
    Each entry's score is its similarity.

    fraction / count: share of decoder compute to skip, or the number of attention sublayers.
    (calibration fields: see CalibratedStrategy)
    """
    use_when = "attention sublayers are redundant: drops the most similar ones, saving their compute and KV cache"

    def plan(self, model: nn.Module) -> SkipPlan:
        n = len(decoder_layers(model))
        sims = self.measure(model)
        cands = skippable(model, "attention", self.protect_last)
        k = units_for_budget(model, "attention", self.fraction, self.count, len(cands), "AttentionDrop")
        chosen = sorted(cands, key=lambda i: -sims.attention[i])[:k]
        entries = [SkipEntry(i, "attention", round(sims.attention[i], 6)) for i in chosen]
        return SkipPlan(entries, "attn_drop", n, {"fraction": self.fraction, "calibration_tokens": sims.tokens})
