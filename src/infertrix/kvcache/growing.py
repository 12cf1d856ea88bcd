"""``growing_kv``: the full KV cache, stored in buffers that grow with headroom instead of per token.

transformers' ``DynamicLayer`` appends each decoded token with ``torch.cat``, which allocates and
copies the layer's whole cache on every step (two copies per layer per token: O(n) bytes moved
for an O(1) append). With small, fast models the copies are a real share of a decode step: on
SmolLM2 with W4A8 weights they are ~10% of it (BENCHMARKS.md quant-e2e), and glibc hands the fresh
buffers out as newly mapped pages that fault in on first touch. ``GrowingLayer`` keeps a buffer
with headroom (``ceil(need * (1 + headroom))``, at least ``min_headroom`` tokens more) and writes new
tokens in place; ``keys``/``values`` are views of its filled prefix, so everything that reads them
(attention, ``get_seq_length``, ``crop``) sees exactly what ``DynamicLayer`` would hold. This is
the amortised growth of a dynamic array, the idea transformers' ``StaticCache`` takes to the limit
(one allocation of the maximum length, then attention over it all with a mask).

Exact: bit-identical outputs to the default cache (tested with greedy and beam search, padded
batches, cache reuse and ``crop``). Memory: the headroom (default 25% or 128 tokens, whichever
is more) is allocated but not yet used. Sliding-window layers keep transformers' own class. When a
KV-cache policy or KIVI is applied, their ``PolicyCache`` is used instead and this has no effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..core import Applied, ConfigError, Stage, Transform, register_transform
from ..core.generation import add_generate_hook, cache_argument_name


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose tokens live in buffers with headroom (see the module docstring)."""

    def __init__(self, headroom: float = 0.25, min_headroom: int = 128) -> None:
        super().__init__()
        self.headroom = headroom
        self.min_headroom = min_headroom
        self.kbuf: Tensor | None = None
        self.vbuf: Tensor | None = None
        self.reallocations = 0

    def _owns_prefix(self) -> bool:
        """True while ``keys``/``values`` are still the prefix views of the buffers (not replaced by
        ``batch_select_indices``, ``reorder_cache``, ``batch_repeat_interleave`` or a caller)."""
        k, v, kb, vb = self.keys, self.values, self.kbuf, self.vbuf
        return (
            kb is not None
            and k.dim() == 4
            and k.data_ptr() == kb.data_ptr()
            and v.data_ptr() == vb.data_ptr()
            and k.stride() == kb.stride()
            and v.stride() == vb.stride()
            and k.shape[:2] == kb.shape[:2]
        )

    def _fits(self, n: int, need: int, key_states: Tensor) -> bool:
        """The buffers hold this layer's first ``n`` tokens and have room for ``need``, same batch,
        heads and dtype as ``key_states``."""
        kb = self.kbuf
        return (
            kb is not None
            and need <= kb.shape[-2]
            and kb.shape[:2] == key_states.shape[:2]
            and kb.dtype == key_states.dtype
            and (n == 0 or self._owns_prefix())
        )

    def _grow(self, n: int, need: int, key_states: Tensor, value_states: Tensor) -> None:
        cap = max(math.ceil(need * (1 + self.headroom)), need + self.min_headroom)
        kb = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
        vb = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
        if n:
            kb[:, :, :n].copy_(self.keys)
            vb[:, :, :n].copy_(self.values)
        self.kbuf, self.vbuf = kb, vb
        self.reallocations += 1

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.append(key_states, value_states)

    def append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens after the held ones (in place while the buffers have room) and
        return ``keys``, ``values``: views of the buffers' filled prefix."""
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        need = n + key_states.shape[-2]
        if not self._fits(n, need, key_states):
            self._grow(n, need, key_states, value_states)
        self.kbuf[:, :, n:need].copy_(key_states)
        self.vbuf[:, :, n:need].copy_(value_states)
        self.keys = self.kbuf[:, :, :need]
        self.values = self.vbuf[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        self.kbuf = self.vbuf = None
        super().reset()

    def reserved_bytes(self) -> int:
        """Bytes the buffers hold, headroom included."""
        return sum(t.numel() * t.element_size() for t in (self.kbuf, self.vbuf) if t is not None)


class GrowingCache(DynamicCache):
    """``DynamicCache`` whose full-attention layers are :class:`GrowingLayer` (needs the model config)."""

    def __init__(self, config, headroom: float = 0.25, min_headroom: int = 128) -> None:
        super().__init__(config=config)
        self.layers = [
            GrowingLayer(headroom, min_headroom) if type(layer) is DynamicLayer else layer for layer in self.layers
        ]


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
        from .attach import generate_leaves_cache_to_us, kv_setup

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


__all__ = ["GrowingCache", "GrowingKV", "GrowingLayer", "growing_cache"]

