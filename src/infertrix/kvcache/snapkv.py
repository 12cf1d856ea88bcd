"""SnapKV: score the prompt by the attention of its last tokens (the observation window), pooled.

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
https://arxiv.org/abs/2404.14469.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core import register_transform
from .context import FORCE_KEEP, ScoreContext
from .window import ObservationWindowPolicy


@register_transform("snapkv")
@dataclass
class SnapKV(ObservationWindowPolicy):
    """Attention of the last ``window_size`` prompt queries, averaged over the window and each KV
    head's query group, smoothed by average pooling; the window itself is always kept. Costs one
    ``window_size x prompt`` attention per layer at prefill. Lossy.

    - ``window_size``: observation window (the paper uses 32), always kept (a shorter prompt is kept
      whole; ``describe()`` counts prompts whose budget is below the window).
    - ``kernel_size``: odd pooling width that keeps neighbours of important tokens (the paper: 7).
    """
    use_when = "long prompts with a short answer (documents, retrieval, QA): keeps what the prompt's last tokens attend to"

    def score(self, ctx: ScoreContext) -> Tensor:
        scores, w = self.window_scores(ctx)
        scores[..., -w:] += FORCE_KEEP
        return scores
