"""``PolicyCache``: a transformers 5.x ``Cache`` whose full-attention layers can evict, merge and quantize.

The cache is built from the model config exactly like ``DynamicCache(config=...)``: sliding-window,
chunked, linear-attention and hybrid layers get transformers' own stock layer classes and are left
alone; only plain ``full_attention`` layers become :class:`PolicyLayer`, a ``DynamicLayer`` subclass
(through :class:`~infertrix.kvcache.growing.GrowingLayer`: tokens are appended in place into buffers
with room for ``POLICY_HEADROOM`` more, one group for a KIVI residual, not concatenated per step) that overrides the minimum:

- ``get_seq_length`` reports every token ever seen (``cumulative_length``), so rotary positions and
  ``generate``'s input slicing stay right after eviction;
- ``get_mask_sizes`` reports the stored length plus its offset (``cumulative - stored``), as
  ``DynamicSlidingWindowLayer`` does, so the causal and padding masks line up with the compact cache;
- ``compress(index)`` keeps the given tokens per batch row and KV head, copying them into new,
  smaller tensors (``infertrix::kv_gather``): memory really shrinks, nothing is masked;
- with a :class:`KVQuantSpec` the stored tokens live KIVI-style in 2/4-bit codes (keys per channel,
  values per token) behind a full-precision residual window of recent tokens; attention over them
  dequantizes into a shared buffer, except decoding steps under KIVI's attention function, which
  read the codes directly (:meth:`PolicyLayer.attend_quantized`).

Why the padding masks stay right: stored tokens are kept in position order and pads are evicted
first, so with left padding the kept pads of a row are its first stored slots, exactly as many as the
zeros in the right-aligned window ``[cumulative - stored, cumulative)`` of that row's 2D attention
mask. Layers may hold different lengths (PyramidKV); the cache then reports the longest one and the
attention pre-hook gives each layer the suffix of the mask that matches its own length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    get_layer_types_and_kwargs,
)

from ..ops.kivi_attention import kivi_decode_attention
from ..ops.kv_cache_ops import kv_dequantize, kv_dequantize_into, kv_gather, kv_quantize
from .growing import GrowingLayer


@dataclass(frozen=True)
class KVQuantSpec:
    """How a :class:`PolicyLayer` stores KV in few bits (see :class:`infertrix.kvcache.KIVI`)."""

    bits: int = 4
    group_size: int = 32  # keys: tokens per per-channel group; values: channels per per-token group
    residual_length: int = 32  # most recent tokens kept in full precision


@dataclass
class CompressionLog:
    """How many layer compression steps a policy ran (prompts too short to compress included) and why
    some kept more than the requested budget (a short prompt under a window the method always keeps,
    say). Shared by the layers of a :class:`PolicyCache`, and by every cache one model's ``generate``
    receives: ``describe()`` shows it."""

    steps: int = 0
    kept_more: dict[str, int] = field(default_factory=dict)  # reason -> layer compressions

    def note(self, reason: str) -> None:
        self.kept_more[reason] = self.kept_more.get(reason, 0) + 1

    def report(self) -> dict[str, str]:
        if not self.kept_more:
            return {}
        n = sum(self.kept_more.values())
        why = "; ".join(f"{count}x {reason}" for reason, count in self.kept_more.items())
        return {"kept_more_than_budget": f"{n} of {self.steps} layer compression steps since optimize ({why})"}


class CacheCropError(RuntimeError):
    """``crop`` cannot roll the cache back exactly (the tokens to remove were evicted or quantized)."""


POLICY_HEADROOM = 32  # token slots a PolicyLayer allocates ahead of its stored tokens


class PolicyLayer(GrowingLayer):
    """One full-attention layer of a :class:`PolicyCache` (see the module docstring).

    ``keys``/``values`` hold the full-precision tokens ([B, H_kv, S, D]); with quantization they are
    the residual window and ``qkeys``/``qvalues`` hold the older tokens. New tokens are appended in
    place into buffers with headroom (:class:`GrowingLayer`, no copy of the layer per step); a
    compression, flush or batch reordering stores new tensors and the next append re-buffers them.
    ``aux`` holds per-token policy state ([B, H_kv, S], e.g. H2O's accumulated attention) that
    follows every eviction, ``queries`` the most recent post-rotary queries ([B, H_q, w, D])
    attention-based policies score with, and ``recent`` how many trailing stored tokens are
    guaranteed to be the most recent ones in every row and head (the queries' own keys; what
    ``crop`` can remove).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, quant: KVQuantSpec | None = None, **kwargs) -> None:
        # room for POLICY_HEADROOM more tokens (a quantized residual: one group, all it grows between
        # flushes); no proportional headroom, so an evicting policy's memory stays within ~1% of its
        # budget (kv_bytes counts the headroom) while a buffer is copied only every 32 tokens
        super().__init__(headroom=0.0, min_headroom=quant.group_size if quant else POLICY_HEADROOM)
        self.quant = quant
        self.cumulative_length = 0
        self.qkeys: tuple[Tensor, Tensor, Tensor] | None = None
        self.qvalues: tuple[Tensor, Tensor, Tensor] | None = None
        self.n_quantized = 0
        self.aux: dict[str, Tensor] = {}
        self.queries: Tensor | None = None
        self.recent = 0
        self.steps_since_compress = 0
        self.flush_in_update = True  # the policy's hook flushes itself, after it has compressed
        # float32 buffers the quantized tokens are dequantized into for attention, shared by all the
        # layers of a PolicyCache (layers run one after another): set by PolicyCache, else per layer
        self.scratch: dict[str, Tensor] = {}
        self.siblings: list[PolicyLayer] = [self]  # the cache's policy layers (set by PolicyCache)
        self.pending = None  # scores of a compression deferred to the forward's last layer (DensityKV)
        self.log = CompressionLog()  # shared with the cache's other layers (set by PolicyCache)
        # set by the attention pre-hook for one decoding step whose attention reads the quantized
        # tokens from their codes (KIVI's attention function): update then returns only the residual
        # window, dequantizes nothing, and leaves the flush to the post-hook (after attention)
        self.attend_codes = False

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def residual_len(self) -> int:
        return (
            0
            if not self.is_initialized or self.keys is None or self.keys.dim() < 4
            else self.keys.shape[-2]
        )

    @property
    def stored_length(self) -> int:
        return self.n_quantized + self.residual_len

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length
        return stored + query_length, self.cumulative_length - stored

    # -- storage -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.cumulative_length += n
        self.recent += n
        self.append(key_states, value_states)
        for name, t in self.aux.items():
            self.aux[name] = torch.cat([t, t.new_zeros((*t.shape[:2], n))], dim=-1)
        if self.attend_codes and n == 1 and self.n_quantized:
            return self.keys, self.values  # see attend_quantized
        if self.n_quantized:
            k_all, v_all = self.full_keys_values()
        else:
            k_all, v_all = self.keys, self.values
        if self.flush_in_update:
            self.flush()
        return k_all, v_all

    def full_keys_values(self) -> tuple[Tensor, Tensor]:
        """All stored tokens in full precision (dequantized where needed), [B, H, S, D].

        With quantized tokens and float32 states these are views of the cache's shared scratch
        buffers, overwritten by the next layer's call: consume them before then (attention does).
        """
        if not self.n_quantized:
            return self.keys, self.values
        if self.keys.dtype != torch.float32:
            return (
                torch.cat([self._dequant_keys(), self.keys], dim=-2),
                torch.cat([self._dequant_values(), self.values], dim=-2),
            )
        q, nq = self.quant, self.n_quantized
        k, v = self._scratch("keys"), self._scratch("values")
        kv_dequantize_into(*self.qkeys, q.bits, q.group_size, True, k[:, :, :nq])
        d = self.values.shape[-1]
        kv_dequantize_into(*self.qvalues, q.bits, min(q.group_size, d), False, v[:, :, :nq])
        k[:, :, nq:].copy_(self.keys)
        v[:, :, nq:].copy_(self.values)
        return k, v

    def attend_quantized(self, query: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        """Softmax attention of one query token per row over every stored token, the quantized ones
        read from their KIVI codes (``infertrix::kivi_decode_attention``; nothing is dequantized).

        ``query`` [B, H_q, 1, D]; ``mask`` additive [B, stored] or None. Returns [B, 1, H_q, D], the
        layout transformers' attention functions return. Cost: one pass over the codes (bits/32 of
        a float32 cache) instead of writing and reading a dequantized copy.
        """
        q = self.quant
        out = kivi_decode_attention(
            query[:, :, 0], *self.qkeys, *self.qvalues, self.keys, self.values, mask, q.bits, scaling
        )
        return out.unsqueeze(1)

    def _scratch(self, name: str) -> Tensor:
        """A [B, H, stored, D] view of the shared buffer ``name``, grown in steps of 256 tokens."""
        b, h, _, d = self.keys.shape
        s = self.stored_length
        buf = self.scratch.get(name)
        if (
            buf is None
            or buf.shape[0] != b
            or buf.shape[1] != h
            or buf.shape[3] != d
            or buf.shape[2] < s
            or buf.device != self.keys.device
        ):
            cap = -(-(s + s // 8) // 256) * 256
            buf = torch.empty(b, h, cap, d, dtype=torch.float32, device=self.keys.device)
            self.scratch[name] = buf
        return buf[:, :, :s]

    def compress(
        self, index: Tensor, keys: Tensor | None = None, values: Tensor | None = None
    ) -> None:
        """Keep tokens ``index`` ([B, H_kv, K] int64, ascending per row/head) and free the rest.

        ``keys``/``values`` optionally replace the full-precision stored states first (merging
        policies pass updated ones of the same shape).
        """
        old = self.stored_length
        if keys is None:
            keys, values = self.full_keys_values()
        k = index.shape[-1]
        self._store(kv_gather(keys.contiguous(), index), kv_gather(values.contiguous(), index))
        self.qkeys = self.qvalues = None
        self.n_quantized = 0
        for name, t in self.aux.items():
            self.aux[name] = torch.gather(t, -1, index)
        # how many trailing slots are still the most recent tokens in every row and head
        expect = torch.arange(old - k, old, device=index.device)
        run = torch.cumprod((index == expect).flip(-1).to(torch.int32), dim=-1).sum(-1)
        self.recent = min(self.recent, int(run.min()) if run.numel() else 0)
        if self.queries is not None:
            keep_q = min(self.queries.shape[-2], self.recent)
            self.queries = self.queries[:, :, self.queries.shape[-2] - keep_q :]
        self.steps_since_compress = 0

    def flush(self) -> None:
        """Move residual tokens beyond the full-precision window into the quantized store."""
        q = self.quant
        if q is None or not self.is_initialized or self.pending is not None:
            return  # (a pending compression flushes after it has evicted: no second rounding)
        extra = self.residual_len - q.residual_length
        nblk = extra // q.group_size if extra > 0 else 0
        if nblk <= 0:
            return
        n = nblk * q.group_size
        kb, vb = self.keys[:, :, :n], self.values[:, :, :n]
        b, h, _, d = kb.shape
        # keys per channel: rows are (block, channel), elements the block's tokens
        kt = kb.reshape(b, h, nblk, q.group_size, d).transpose(-1, -2).contiguous()
        qk = kv_quantize(kt, q.bits, q.group_size)
        qv = kv_quantize(vb.contiguous(), q.bits, min(q.group_size, d))
        self.qkeys = (
            qk
            if self.qkeys is None
            else tuple(torch.cat([a, c], dim=2) for a, c in zip(self.qkeys, qk, strict=True))
        )
        self.qvalues = (
            qv
            if self.qvalues is None
            else tuple(torch.cat([a, c], dim=2) for a, c in zip(self.qvalues, qv, strict=True))
        )
        self.n_quantized += n
        self._store(self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous())

    def _dequant_keys(self) -> Tensor:
        q = self.quant
        packed, scale, zero = self.qkeys
        b, h, nblk, d, _ = packed.shape
        kt = kv_dequantize(packed, scale, zero, q.bits, q.group_size)  # [B, H, nblk, D, G]
        return kt.transpose(-1, -2).reshape(b, h, nblk * q.group_size, d).to(self.keys.dtype)

    def _dequant_values(self) -> Tensor:
        q = self.quant
        packed, scale, zero = self.qvalues
        d = packed.shape[-1] * 8 // q.bits
        return kv_dequantize(packed, scale, zero, q.bits, min(q.group_size, d)).to(self.keys.dtype)

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
                f"cannot crop {n} tokens: only the last {exact} tokens are still stored exactly (older ones "
                "were evicted, merged or quantized); keep a recent window at least as long as the rollback "
                "(e.g. window_size >= the number of draft tokens) or use a larger KIVI residual_length"
            )
        self.keys = self.keys[:, :, :-n]
        self.values = self.values[:, :, :-n]
        for name, t in self.aux.items():
            self.aux[name] = t[..., :-n]
        if self.queries is not None:
            self.queries = self.queries[:, :, : max(0, self.queries.shape[-2] - n)]
        self.cumulative_length -= n
        self.recent -= n

    def _store(self, keys: Tensor, values: Tensor) -> None:
        """Hold new tensors as the full-precision tokens, releasing the append buffers."""
        self.keys, self.values = keys, values
        self.kbuf = self.vbuf = None

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not self.is_initialized:
            return
        self._store(fn(self.keys), fn(self.values))
        self.aux = {k: fn(v) for k, v in self.aux.items()}
        if self.queries is not None:
            self.queries = fn(self.queries)
        if self.qkeys is not None:
            self.qkeys = tuple(fn(t) for t in self.qkeys)
            self.qvalues = tuple(fn(t) for t in self.qvalues)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.keys = self.values = None
        self.kbuf = self.vbuf = None
        self.scratch.clear()
        self.is_initialized = False
        self.cumulative_length = 0
        self.qkeys = self.qvalues = None
        self.n_quantized = 0
        self.aux = {}
        self.queries = None
        self.recent = 0
        self.steps_since_compress = 0
        self.pending = None
        self.attend_codes = False

    # -- accounting ----------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes allocated for the keys and values (codes, scales and zeros included; the append
        buffers' headroom included while the stored tokens live in them)."""
        if not self.is_initialized:
            return 0
        if self._owns_prefix():
            total = self.kbuf.nbytes + self.vbuf.nbytes
        else:
            total = self.keys.nbytes + self.values.nbytes
        for store in (self.qkeys, self.qvalues):
            if store is not None:
                total += sum(t.nbytes for t in store)
        return total

    def state_bytes(self) -> int:
        """Bytes of the policy's own per-token state (accumulated scores, recent queries)."""
        total = sum(t.nbytes for t in self.aux.values())
        return total + (self.queries.nbytes if self.queries is not None else 0)

    def full_kv_bytes(self) -> int:
        """Bytes a plain ``DynamicLayer`` would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.keys.shape
        return 2 * b * h * d * self.cumulative_length * self.keys.element_size()


class PolicyCache(Cache):
    """A ``Cache`` built from a model config whose full-attention layers follow a KV policy.

    ``policy`` is an eviction/merging policy (a :class:`~infertrix.kvcache.policy.KVPolicy`) or None;
    ``quant`` a :class:`KVQuantSpec` or None; ``log`` the :class:`CompressionLog` to count into (a
    new one when None). Other layer types (sliding window, chunked, linear
    attention, hybrid) are transformers' stock layers. Use it like any cache: ``generate`` receives
    one automatically after ``optimize``; for manual loops get one from
    :func:`infertrix.kvcache.new_cache`.
    """

    def __init__(
        self,
        config,
        policy=None,
        quant: KVQuantSpec | None = None,
        log: CompressionLog | None = None,
    ) -> None:
        text_config = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers = []
        scratch: dict[str, Tensor] = {}  # one set of dequantization buffers for all layers
        siblings: list[PolicyLayer] = []
        log = CompressionLog() if log is None else log
        for layer_type, kwargs in zip(layer_types, per_layer_kwargs, strict=True):
            if layer_type == "full_attention":
                layer = PolicyLayer(quant=quant)
                layer.flush_in_update = policy is None
                layer.scratch = scratch
                layer.siblings = siblings
                layer.log = log
                siblings.append(layer)
                layers.append(layer)
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)
        self.log = log
        self.policy = policy
        self.quant = quant
        self.policy_layer_indices = [
            i for i, layer in enumerate(layers) if isinstance(layer, PolicyLayer)
        ]

    @property
    def policy_layers(self) -> list[PolicyLayer]:
        return [self.layers[i] for i in self.policy_layer_indices]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], PolicyLayer):
            layer = self.layers[layer_idx]
            # layers may hold different lengths (per-layer budgets): size the shared mask for the longest
            stored = max(lay.stored_length for lay in self.policy_layers)
            return stored + query_length, layer.cumulative_length - stored
        return super().get_mask_sizes(query_length, layer_idx)

    def kv_bytes(self) -> int:
        """Bytes of all stored keys and values, stock layers included."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                total += layer.kv_bytes()
            elif getattr(layer, "is_initialized", False) and isinstance(
                getattr(layer, "keys", None), Tensor
            ):
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def full_kv_bytes(self) -> int:
        """Bytes the same tokens would take in a plain ``DynamicCache``."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                total += layer.full_kv_bytes()
            elif getattr(layer, "is_initialized", False) and isinstance(
                getattr(layer, "keys", None), Tensor
            ):
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def state_bytes(self) -> int:
        return sum(layer.state_bytes() for layer in self.policy_layers)

    def scratch_bytes(self) -> int:
        """Bytes of the dequantization buffers the layers share (KIVI; 0 before any decoding)."""
        layers = self.policy_layers
        return sum(t.nbytes for t in layers[0].scratch.values()) if layers else 0

    def stored_lengths(self) -> list[int]:
        return [layer.stored_length for layer in self.policy_layers]
