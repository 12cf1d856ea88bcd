"""The engine's KV storage: a transformers ``Cache`` whose layers keep keys and values in
preallocated buffers ``[batch, kv_heads, capacity, head_dim]`` (capacity doubles when full).

The engine writes new tokens in place (``infertrix::kv_append``) and attends over the buffers
directly; the module path sees an ordinary ``DynamicLayer`` (``keys``/``values`` are views of the
filled prefix), so a forward that falls back mid-generation reads and extends the same storage.
Rolling back (``crop``, what speculative decoding does after a rejection) only moves the length.
Every layer keeps all tokens; sliding-window layers get their window from the attention mask
(module path) or the engine's attention bound, not from dropping storage.

The engine also runs on the KV-cache transforms' storage (``kvcache/cache.py``'s contract:
``reserve`` -> write -> ``commit``): :class:`~infertrix.kvcache.GrowingCache` and the policies'
``EvictingCache`` / ``PolicyCache``, whose layers may hold fewer tokens than they have seen (evicted)
and different counts per layer (PyramidKV). :func:`begin` gives the runner one layer's buffers, the
slot its new tokens go to and each row's first valid slot; rotary positions stay the true ones.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..kvcache.cache import EvictingCache, EvictingLayer, GrowingCache, GrowingLayer


class EngineLayer(DynamicLayer):
    """One layer's keys and values in buffers with room to grow (see the module docstring)."""

    def __init__(self) -> None:
        self.kbuf: Tensor | None = None
        self.vbuf: Tensor | None = None
        self.length = 0
        super().__init__()

    # keys/values: views of the filled prefix; assigning a tensor (batch selection, beam reorder,
    # a reset) adopts it as the new storage
    @property
    def keys(self) -> Tensor | None:
        return None if self.kbuf is None else self.kbuf[:, :, : self.length]

    @keys.setter
    def keys(self, value: Tensor | None) -> None:
        self.kbuf, self.length = self._adopt(self.kbuf, value)

    @property
    def values(self) -> Tensor | None:
        return None if self.vbuf is None else self.vbuf[:, :, : self.length]

    @values.setter
    def values(self, value: Tensor | None) -> None:
        self.vbuf, self.length = self._adopt(self.vbuf, value)

    def _adopt(self, buf: Tensor | None, value: Tensor | None) -> tuple[Tensor | None, int]:
        if value is None:
            return None, 0
        if value.dim() != 4:  # DynamicLayer's empty placeholder
            return None, 0
        if buf is not None and value.data_ptr() == buf.data_ptr() and value.stride() == buf.stride():
            return buf, value.shape[-2]  # a prefix of the same buffer (a crop)
        return value.contiguous(), value.shape[-2]

    def reserve(self, like: Tensor, batch: int, kv_heads: int, need: int, head_dim: int) -> None:
        """Make room for ``need`` tokens (keeping the held ones), in ``like``'s dtype and device."""
        buf = self.kbuf
        if buf is not None and buf.shape[0] == batch and buf.shape[1] == kv_heads and buf.shape[2] >= need and buf.shape[3] == head_dim:
            return
        cap = max(need, 2 * (buf.shape[2] if buf is not None else 0), 64)
        shape = (batch, kv_heads, cap, head_dim)
        kb, vb = like.new_zeros(shape), like.new_zeros(shape)
        if self.length:
            kb[:, :, : self.length].copy_(self.kbuf[:, :, : self.length])
            vb[:, :, : self.length].copy_(self.vbuf[:, :, : self.length])
        self.kbuf, self.vbuf = kb, vb
        if not self.is_initialized:
            self.device = like.device
            self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.length, key_states.shape[-2]
        self.reserve(key_states, key_states.shape[0], key_states.shape[1], n + t, key_states.shape[-1])
        self.kbuf[:, :, n : n + t].copy_(key_states)
        self.vbuf[:, :, n : n + t].copy_(value_states)
        self.length = n + t
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"EngineLayer.crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self.kbuf = self.vbuf = None
        self.length = 0
        self.is_initialized = False


class EngineCache(DynamicCache):
    """A ``DynamicCache`` of :class:`EngineLayer` (one per decoder layer of ``config``)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.layers = [EngineLayer() for _ in self.layers]

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ly in self.layers for t in (ly.kbuf, ly.vbuf) if t is not None)


def storage_problem(cache: object, batch: int | None = None, tokens: int = 1) -> str | None:
    """Why the engine cannot read and write ``cache``'s storage (for ``tokens`` new tokens in each of
    ``batch`` rows), or None."""
    if not isinstance(cache, EngineCache | GrowingCache | EvictingCache):
        return (f"the cache is a {type(cache).__name__} (the engine runs EngineCache, GrowingCache and the KV "
                "policies' EvictingCache / PolicyCache)")
    for i, layer in enumerate(cache.layers):
        if type(layer) is EngineLayer:  # every forward checks every layer: read the buffer, not a view of it
            if batch is not None and layer.length and layer.kbuf.shape[0] != batch:
                return "the cache holds another batch size"
            continue
        if not isinstance(layer, EngineLayer | GrowingLayer):
            return (f"layer {i} of the {type(cache).__name__} is a {type(layer).__name__} (the engine writes "
                    "EngineLayer / GrowingLayer / EvictingLayer storage)")
        if isinstance(layer, EvictingLayer) and layer.n_quantized and tokens > 1:
            return (f"a window of {tokens} tokens over layer {i}'s KIVI codes (the engine reads codes one "
                    "token per row, with kivi_decode_attention)")
        keys = layer.keys
        if batch is not None and keys is not None and keys.dim() == 4 and keys.shape[-2] and keys.shape[0] != batch:
            return "the cache holds another batch size"
    return None


def begin(layer: DynamicLayer, like: Tensor, batch: int, kv_heads: int, t: int, head_dim: int,
          pads: Tensor) -> tuple[Tensor, Tensor, int, Tensor]:
    """Room for ``t`` new tokens in ``layer``: (key buffer, value buffer, the slot they go to, each
    row's first valid slot). ``pads`` [B]: each row's left padding in position space; an evicting
    layer's rows start after their kept pads and lead fillers (``EvictingLayer.first_slots``,
    kvcache/cache.py's module docstring)."""
    if isinstance(layer, EngineLayer):
        index = layer.length
        layer.reserve(like, batch, kv_heads, index + t, head_dim)
        return layer.kbuf, layer.vbuf, index, pads
    empty = like.new_empty(batch, kv_heads, 0, head_dim)
    if not layer.is_initialized:
        layer.lazy_initialization(empty, empty)
    index = layer.reserve(t, empty, empty)
    if not isinstance(layer, EvictingLayer):
        return layer.kbuf, layer.vbuf, index, pads
    return layer.kbuf, layer.vbuf, index, layer.start_slots(pads)


def commit(layer: DynamicLayer, t: int) -> None:
    """Make the ``t`` tokens the engine wrote after :func:`begin` part of ``layer``."""
    if isinstance(layer, EngineLayer):
        layer.length += t
    else:
        layer.commit(t)


__all__ = ["EngineCache", "EngineLayer", "begin", "commit", "storage_problem"]
