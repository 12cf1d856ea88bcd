"""``growing_kv``: the full KV cache, stored in buffers that grow with headroom instead of per token.

transformers' ``DynamicLayer`` appends each decoded token with ``torch.cat``, which allocates and
copies the layer's whole cache on every step (two copies per layer per token: O(n) bytes moved
for an O(1) append). With small, fast models the copies are a real share of a decode step: on
SmolLM2 with W4A8 weights they are ~10% of it (BENCHMARKS.md quant-e2e), and glibc hands the fresh
buffers out as newly mapped pages that fault in on first touch. :class:`~infertrix.kvcache.cache.GrowingLayer` keeps a buffer
with headroom (``ceil(need * (1 + headroom))``, at least ``min_headroom`` tokens more) and writes new
tokens in place; ``keys``/``values`` are views of its filled prefix, so everything that reads them
(attention, ``get_seq_length``, ``crop``) sees exactly what ``DynamicLayer`` would hold. This is
the amortised growth of a dynamic array, the idea transformers' ``StaticCache`` takes to the limit
(one allocation of the maximum length, then attention over it all with a mask).

Exact: bit-identical outputs to the default cache (tested with greedy and beam search, padded
batches, cache reuse and ``crop``). Memory: the headroom (default 25% or 128 tokens, whichever
is more) is allocated but not yet used. Sliding-window layers keep transformers' own class. When a
KV-cache policy or KIVI is applied, their ``PolicyCache`` is used instead and this has no effect.
The layer and cache classes live with the other storage in :mod:`~infertrix.kvcache.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core import Applied, ConfigError, Stage, Transform, register_transform
from ..core.generation import add_generate_hook, cache_argument_name
from .attach import generate_leaves_cache_to_us, kv_setup
from .cache import GrowingCache


@register_transform("growing_kv")
@dataclass
class GrowingKV(Transform):
    """Give ``generate`` a :class:`GrowingCache` when the caller passes no cache (exact, lossless).

    - ``headroom``: extra capacity, as a fraction of the tokens held, allocated when a buffer grows.
    - ``min_headroom``: at least this many extra token slots per growth.
    """
    use_when = "always, with the full cache: exact, removes transformers' copy of the whole cache per decoded token"

    stage: ClassVar[Stage] = Stage.CACHE
    conflict_group: ClassVar[str | None] = "kv cache storage"

    headroom: float = 0.25
    min_headroom: int = 128

    def validate(self) -> None:
        if not 0.0 <= self.headroom <= 4.0:
            raise ConfigError(f"GrowingKV.headroom must be in [0, 4] (a fraction of the tokens held), got {self.headroom}")
        if self.min_headroom < 1:
            raise ConfigError(f"GrowingKV.min_headroom must be >= 1 token, got {self.min_headroom}")

    def check_model(self, model: nn.Module) -> None:
        if getattr(model, "config", None) is None or not hasattr(model, "generate"):
            raise ConfigError("growing_kv needs a transformers generation model (with .config and .generate)")

    def apply(self, model: nn.Module) -> Applied:
        def hook(m, args: tuple, kwargs: dict[str, Any]):
            # a policy / KIVI brings its own cache
            if generate_leaves_cache_to_us(m, kwargs) and kv_setup(m) is None:
                kwargs[cache_argument_name(m)] = GrowingCache(m.config, self.headroom, self.min_headroom)
            return args, kwargs

        remove = add_generate_hook(model, hook, order=int(self.stage))
        return Applied(self, undo=remove, report=lambda: {"cache": "GrowingCache (full KV, buffers with headroom)",
                                                          "headroom": self.headroom})


def growing_cache(model: nn.Module, **kwargs: Any) -> GrowingCache:
    """A fresh :class:`GrowingCache` for ``model`` (to pass as ``past_key_values`` yourself)."""
    return GrowingCache(model.config, **kwargs)


__all__ = ["GrowingKV", "growing_cache"]

