"""D2O: H2O's scores with evicted tokens merged into their most similar kept token, not dropped.

Wan et al. 2024, "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of
Large Language Models", https://arxiv.org/abs/2406.13035. The merging itself is
:func:`~infertrix.kvcache.merge.merge_evicted`, which any policy uses with ``merge=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import register_transform
from .h2o import H2O


@register_transform("d2o")
@dataclass
class D2O(H2O):
    """H2O's heavy hitters + recent window, with evicted tokens merged into their nearest kept token
    (cosine similarity of keys >= ``merge_threshold``). Lossy, but keeps some information of every
    token; same memory as H2O."""
    use_when = "as H2O, with evicted tokens merged into similar kept ones instead of dropped"

    merge: bool = True
