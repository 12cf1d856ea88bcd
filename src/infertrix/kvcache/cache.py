"""KV storage: the growing layer and cache, and the evicting layer and cache (storage only).

As transformers' ``cache_utils.py``: layer classes override the minimum of ``DynamicLayer``; a cache
is a list of layers built from the config. Policies' scoring state lives in :mod:`.policy_cache`.

- :class:`GrowingLayer`: tokens appended in place into buffers with headroom instead of
  ``torch.cat`` per step; :class:`GrowingCache` is ``DynamicCache`` with those layers.
- :class:`EvictingLayer`: a growing layer whose tokens can be evicted (``compress`` keeps given
  tokens per row and KV head, copying them into compact tensors with ``infertrix::kv_gather``: memory
  really shrinks, nothing is masked), optionally with a :class:`~.kivi_store.KIVIStore` for its older
  tokens. ``get_seq_length`` reports every token ever seen (rotary positions and ``generate``'s
  input slicing stay right); ``get_mask_sizes`` the stored length plus its offset, as
  ``DynamicSlidingWindowLayer`` does. :class:`EvictingCache` gives every ``full_attention`` layer of
  the config one; sliding, chunked and linear-attention layers keep transformers' stock classes.

Storage contract (what a decode engine may read and write):

- ``keys``/``values``: [batch, kv_heads, S, head_dim], the layer's full-precision tokens in position
  order (with a KIVI store: the residual window after ``codes.length`` quantized tokens). While
  ``kbuf``/``vbuf`` are set, ``keys``/``values`` are their ``[:, :, :S]`` prefix views, and the buffers
  ([batch, kv_heads, capacity, head_dim], contiguous) have room up to ``capacity``. After an eviction,
  flush or batch reordering they are None and ``keys``/``values`` are compact tensors of their own.
- To append ``n`` tokens in place: ``reserve(n, key_like, value_like)`` (returns ``S``; the buffers
  then exist and hold at least ``S + n``), write ``kbuf[:, :, S:S+n]`` and ``vbuf[:, :, S:S+n]``, then
  ``commit(n)``, which moves the views and (evicting layers) counts ``cumulative_length``/``recent``.
- Evicting layers: ``cumulative_length`` (tokens ever seen: positions), ``stored_length``, ``recent``
  (trailing stored tokens guaranteed to be the most recent in every row and head: what ``crop`` can
  undo), ``lead`` (None, or [batch] leading slots per row that hold no token: see ``first_slots``),
  ``codes`` (None, or the KIVI store: ``codes.keys``/``codes.values`` code tuples). Read-only
  for an engine; ``compress``, ``flush`` and ``crop`` change them.

Why the padding masks stay right after eviction: stored tokens are kept in position order and pads
are evicted first, so with left padding the kept pads of a row are its first stored slots, exactly as
many as the zeros in the right-aligned window ``[cumulative - stored, cumulative)`` of that row's 2D
mask. Rows may keep different counts (kvcache/rows.py): a row keeping fewer than the widest has
``lead[b]`` filler slots first, hidden like pads (``first_slots``: each row's first valid slot). Layers
may hold different lengths (PyramidKV); the cache then reports the longest one and the attention
pre-hook gives each layer the suffix of the mask that matches its own length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING as STOCK_LAYERS
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs

from ..ops.kv_cache_ops import kv_gather
from .kivi_store import KIVIStore

if TYPE_CHECKING:
    from .kivi import KIVI

EVICTING_HEADROOM = 32  # token slots an EvictingLayer allocates ahead of its stored tokens


class CacheCropError(RuntimeError):
    """``crop`` cannot roll the cache back exactly (the tokens to remove were evicted or quantized)."""


def _layer_types(config) -> tuple[list[str], list[dict]]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return get_layer_types_and_kwargs(text)


def full_attention_layers(config) -> list[int]:
    """Indices of the decoder's plain ``full_attention`` layers (those an EvictingCache evicts in)."""
    layer_types, _ = _layer_types(config)
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose tokens are written in place into buffers with headroom (growing.py)."""

    def __init__(self, headroom: float = 0.25, min_headroom: int = 128) -> None:
        super().__init__()
        self.headroom = headroom
        self.min_headroom = min_headroom
        self.kbuf: Tensor | None = None
        self.vbuf: Tensor | None = None
        self.reallocations = 0

    def _held(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0

    def _owns_prefix(self) -> bool:
        """True while ``keys``/``values`` are still the prefix views of the buffers (not replaced by
        ``batch_select_indices``, ``reorder_cache``, ``batch_repeat_interleave`` or a caller)."""
        k, v, kb, vb = self.keys, self.values, self.kbuf, self.vbuf
        return kb is not None and k.dim() == 4 and k.shape[:2] == kb.shape[:2] and all(
            t.data_ptr() == b.data_ptr() and t.stride() == b.stride() for t, b in ((k, kb), (v, vb))
        )

    def reserve(self, n: int, key_states: Tensor, value_states: Tensor) -> int:
        """Make the buffers hold the stored tokens with room for ``n`` more shaped like
        ``key_states``/``value_states``; returns the stored count (where the new tokens go)."""
        held, kb = self._held(), self.kbuf
        need = held + n
        fits = kb is not None and need <= kb.shape[-2] and kb.shape[:2] == key_states.shape[:2]
        if not (fits and kb.dtype == key_states.dtype and (held == 0 or self._owns_prefix())):
            cap = max(math.ceil(need * (1 + self.headroom)), need + self.min_headroom)
            kb = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
            vb = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
            if held:
                kb[:, :, :held].copy_(self.keys)
                vb[:, :, :held].copy_(self.values)
            self.kbuf, self.vbuf = kb, vb
            self.reallocations += 1
        return held

    def commit(self, n: int) -> None:
        """Make the ``n`` tokens written after the stored ones (see ``reserve``) part of the layer."""
        s = self._held() + n
        self.keys = self.kbuf[:, :, :s]
        self.values = self.vbuf[:, :, :s]

    def append(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens after the held ones (in place while the buffers have room) and
        return ``keys``, ``values``: views of the buffers' filled prefix."""
        n = key_states.shape[-2]
        held = self.reserve(n, key_states, value_states)
        self.kbuf[:, :, held : held + n].copy_(key_states)
        self.vbuf[:, :, held : held + n].copy_(value_states)
        self.commit(n)
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.append(key_states, value_states)

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


class EvictingLayer(GrowingLayer):
    """A full-attention layer whose tokens can be evicted (see the module docstring).

    With a KIVI config its tokens beyond the full-precision window move into ``codes`` on ``flush``.
    """

    def __init__(self, quant: KIVI | None = None, scratch: dict[str, Tensor] | None = None) -> None:
        # room for EVICTING_HEADROOM more tokens (a quantized residual: one group, all it grows between
        # flushes); no proportional headroom, so an evicting policy's memory stays within ~1% of its
        # budget (kv_bytes counts the headroom) while a buffer is copied only every 32 tokens
        super().__init__(headroom=0.0, min_headroom=quant.group_size if quant else EVICTING_HEADROOM)
        self.cumulative_length = 0
        self.recent = 0
        self.lead: Tensor | None = None  # [B] leading filler slots per row (rows that keep fewer than the widest)
        self.fillers = 0  # their sum
        self.codes = None if quant is None else KIVIStore(quant, scratch)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def residual_len(self) -> int:  # full-precision tokens
        return self._held() if self.is_initialized else 0

    @property
    def n_quantized(self) -> int:  # tokens in the KIVI store
        return self.codes.length if self.codes is not None else 0

    @property
    def stored_length(self) -> int:
        return self.n_quantized + self.residual_len

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length
        return stored + query_length, self.cumulative_length - stored

    def first_slots(self, pads: Tensor | None) -> Tensor | None:
        """[B] each row's first slot holding one of its tokens (its kept pads, ``pads`` [B] being its
        left padding in position space, and its ``lead`` fillers come before), or None when every row
        starts at slot 0."""
        first = self.lead if pads is None else self.start_slots(pads)
        return first if first is not None and bool(first.any()) else None

    def start_slots(self, pads: Tensor) -> Tensor:
        """:meth:`first_slots` as a tensor, zeros included, without reading a value back (the
        engine's ``begin`` calls it for every layer of every step)."""
        evicted = self.cumulative_length - self.stored_length
        first = (pads - evicted).clamp_min(0) if evicted else pads
        return first if self.lead is None else torch.maximum(first, self.lead.to(first.device))

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]

    def commit(self, n: int) -> None:
        super().commit(n)
        self.cumulative_length += n
        self.recent += n

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states, value_states)
        return self.full_keys_values()

    def full_keys_values(self) -> tuple[Tensor, Tensor]:
        """All stored tokens in full precision (dequantized where needed), [B, H, S, D]; see
        :meth:`KIVIStore.with_residual` for how long views of the scratch buffers stay valid."""
        if not self.n_quantized:
            return self.keys, self.values
        return self.codes.with_residual(self.keys, self.values)

    def compress(self, index: Tensor, keys: Tensor | None = None, values: Tensor | None = None,
                 lead: Tensor | None = None) -> None:
        """Keep tokens ``index`` ([B, H_kv, K] int64, ascending per row/head after its first
        ``lead[b]`` slots) and free the rest.

        ``keys``/``values`` optionally replace the full-precision stored states first (merging
        policies pass updated ones of the same shape); ``lead`` [B]: how many of each row's first
        kept slots are fillers (None: none), see ``first_slots``.
        """
        old = self.stored_length
        if keys is None:
            keys, values = self.full_keys_values()
        k = index.shape[-1]
        self._store(kv_gather(keys.contiguous(), index), kv_gather(values.contiguous(), index))
        if self.codes is not None:
            self.codes.clear()
        self.fillers = 0 if lead is None else int(lead.sum())  # for describe(), read once here
        self.lead = lead if self.fillers else None
        # how many trailing slots are still the most recent tokens in every row and head
        expect = torch.arange(old - k, old, device=index.device)
        run = torch.cumprod((index == expect).flip(-1).to(torch.int32), dim=-1).sum(-1)
        self.recent = min(self.recent, int(run.min()) if run.numel() else 0)

    def flush(self) -> None:
        """Move residual tokens beyond the full-precision window into the KIVI store."""
        if self.codes is None or not self.is_initialized:
            return
        n = self.codes.flushable(self.residual_len)
        if n:
            self.codes.append(self.keys[:, :, :n], self.values[:, :, :n])
            self._store(self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous())

    # -- rollback and batch bookkeeping ------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a positive value is the length to keep).

        Exact only while those tokens are still stored in full precision and were not evicted;
        otherwise raises :class:`CacheCropError` naming why (speculative decoding rolls back through
        this).
        """
        if not self.is_initialized:
            return
        n = -tokens_to_remove if tokens_to_remove < 0 else self.cumulative_length - tokens_to_remove
        if n <= 0:
            return
        exact = min(self.recent, self.residual_len)  # quantized tokens cannot be restored exactly
        if n > exact:
            raise CacheCropError(
                f"cannot crop {n} tokens: only the last {exact} tokens are still stored exactly (older ones were "
                "evicted, merged or quantized); keep a recent window at least as long as the rollback (e.g. "
                "window_size >= the number of draft tokens) or use a larger KIVI residual_length"
            )
        self.keys = self.keys[:, :, :-n]
        self.values = self.values[:, :, :-n]
        self.cumulative_length -= n
        self.recent -= n

    def _store(self, keys: Tensor, values: Tensor) -> None:
        """Hold new tensors as the full-precision tokens, releasing the append buffers."""
        self.keys, self.values = keys, values
        self.kbuf = self.vbuf = None

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        self._store(fn(self.keys), fn(self.values))
        if self.lead is not None:
            self.lead = fn(self.lead)
            self.fillers = int(self.lead.sum())
        if self.codes is not None:
            self.codes.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.map_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.recent = 0
        self.lead = None
        self.fillers = 0
        if self.codes is not None:
            self.codes.clear()
            self.codes.scratch.clear()

    # -- accounting ----------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes allocated for the keys and values (codes, scales and zeros included; the append
        buffers' headroom included while the stored tokens live in them)."""
        if not self.is_initialized:
            return 0
        held = self.kbuf.nbytes + self.vbuf.nbytes if self._owns_prefix() else self.keys.nbytes + self.values.nbytes
        return held + (self.codes.nbytes() if self.codes is not None else 0)

    def full_kv_bytes(self) -> int:
        """Bytes a plain ``DynamicLayer`` would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.keys.shape
        return 2 * b * h * d * self.cumulative_length * self.keys.element_size()


def _layer_bytes(layer, full: bool) -> int:
    """An evicting layer's (full: uncompressed) KV bytes, or a stock layer's."""
    if isinstance(layer, EvictingLayer):
        return layer.full_kv_bytes() if full else layer.kv_bytes()
    if getattr(layer, "is_initialized", False) and isinstance(getattr(layer, "keys", None), Tensor):
        return layer.keys.nbytes + layer.values.nbytes
    return 0


class EvictingCache(Cache):
    """A ``Cache`` built from a model config whose ``full_attention`` layers are :class:`EvictingLayer`
    (with a KIVI store each when ``quant`` is a :class:`~infertrix.kvcache.KIVI` config); other layer
    types (sliding window, chunked, linear attention, hybrid) are transformers' stock layers."""

    def __init__(self, config, quant: KIVI | None = None) -> None:
        layer_types, per_layer_kwargs = _layer_types(config)
        scratch: dict[str, Tensor] = {}  # one set of dequantization buffers for all layers
        layers = [
            EvictingLayer(quant, scratch) if kind == "full_attention" else STOCK_LAYERS[kind](**kwargs)
            for kind, kwargs in zip(layer_types, per_layer_kwargs, strict=True)
        ]
        super().__init__(layers=layers)
        self.quant = quant
        self.evicting_indices = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]

    @property
    def evicting_layers(self) -> list[EvictingLayer]:
        return [self.layers[i] for i in self.evicting_indices]

    def capabilities(self):
        from .capabilities import CacheCapabilities  # that module reads this one's layer classes

        # rows evict as if their masked slots were left padding: no holes inside a row
        return CacheCapabilities("recent", select_rows=False, ragged_rows=False)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], EvictingLayer):
            layer = self.layers[layer_idx]
            # layers may hold different lengths (per-layer budgets): size the shared mask for the longest
            stored = max(lay.stored_length for lay in self.evicting_layers)
            return stored + query_length, layer.cumulative_length - stored
        return super().get_mask_sizes(query_length, layer_idx)

    def kv_bytes(self) -> int:
        """Bytes of all stored keys and values, stock layers included."""
        return sum(_layer_bytes(layer, full=False) for layer in self.layers)

    def full_kv_bytes(self) -> int:
        """Bytes the same tokens would take in a plain ``DynamicCache``."""
        return sum(_layer_bytes(layer, full=True) for layer in self.layers)

    def scratch_bytes(self) -> int:
        """Bytes of the dequantization buffers the layers share (KIVI; 0 before any decoding)."""
        layers = self.evicting_layers
        codes = layers[0].codes if layers else None
        return sum(t.nbytes for t in codes.scratch.values()) if codes is not None else 0

    def stored_lengths(self) -> list[int]:
        return [layer.stored_length for layer in self.evicting_layers]
