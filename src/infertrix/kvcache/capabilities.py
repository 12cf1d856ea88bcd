"""What a cache can undo, for callers that roll back (speculative decoding): a cache's own
``capabilities()``, or what a stock transformers cache supports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

from .cache import GrowingLayer


@dataclass(frozen=True)
class CacheCapabilities:
    """What a cache can undo, for callers that roll back (speculative decoding).

    - ``rollback``: ``"any"``: ``crop`` removes any trailing tokens exactly; ``"recent"``: only those
      still stored exactly (``EvictingLayer.recent``), else :class:`CacheCropError`; ``"none"``.
    - ``select_rows``: ``batch_select_indices`` drops finished rows exactly.
    - ``ragged_rows``: rows may hold masked slots between their tokens, not only left padding.
    """

    rollback: str
    select_rows: bool
    ragged_rows: bool


def capabilities(cache: Any) -> CacheCapabilities:
    """The cache's own ``capabilities()``, or what a stock transformers cache supports."""
    own = getattr(cache, "capabilities", None)
    if callable(own):
        return own()
    layers = list(getattr(cache, "layers", ()))
    croppable = bool(layers) and all(getattr(layer, "is_croppable", False) for layer in layers)
    # exact layer types: subclasses (quantized layers) keep state that batch selection misses
    plain = isinstance(cache, DynamicCache) and bool(layers)
    plain = plain and all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers)
    return CacheCapabilities("any" if croppable else "none", select_rows=plain, ragged_rows=True)
