"""``KIVIStore``: one layer's older tokens in KIVI's 2/4-bit codes (keys per channel, values per token).

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
https://arxiv.org/abs/2402.02750. Storage only: the layer that owns the store
(:class:`~infertrix.kvcache.cache.EvictingLayer`) keeps the full-precision residual window and
decides when tokens move here (``flush``); the :class:`~infertrix.kvcache.KIVI` transform is the
configuration. Attention over the codes either dequantizes into a float32 scratch buffer shared by
all the layers of a cache (layers run one after another) or, for one-token decoding steps, reads
the codes directly (``infertrix::kivi_decode_attention``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops.kivi_attention import kivi_decode_attention
from ..ops.kv_cache_ops import kv_dequantize, kv_dequantize_into, kv_quantize

if TYPE_CHECKING:
    from .kivi import KIVI

Codes = tuple[Tensor, Tensor, Tensor]  # packed uint8, float32 scale, float32 zero


def _cat(old: Codes | None, new: Codes) -> Codes:
    return new if old is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(old, new, strict=True))


class KIVIStore:
    """The quantized tokens of one layer, oldest first: ``length`` tokens in whole groups.

    ``keys``: codes of [B, H, blocks, D, group] (per channel over ``group_size`` tokens);
    ``values``: codes of [B, H, tokens, D] (per token over ``min(group_size, D)`` channels).
    ``scratch``: the dequantization buffers, shared by the store's cache.
    """

    def __init__(self, config: KIVI, scratch: dict[str, Tensor] | None = None) -> None:
        self.config = config
        self.keys: Codes | None = None
        self.values: Codes | None = None
        self.length = 0
        self.scratch: dict[str, Tensor] = {} if scratch is None else scratch

    def flushable(self, residual: int) -> int:
        """How many of ``residual`` full-precision tokens (oldest first) are due for quantizing:
        whole groups beyond the ``residual_length`` window."""
        c = self.config
        extra = residual - c.residual_length
        return (extra // c.group_size) * c.group_size if extra > 0 else 0

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Quantize [B, H, n, D] tokens (n a multiple of ``group_size``) after the stored ones."""
        c = self.config
        b, h, n, d = keys.shape
        nblk = n // c.group_size
        # keys per channel: rows are (block, channel), elements the block's tokens
        kt = keys.reshape(b, h, nblk, c.group_size, d).transpose(-1, -2).contiguous()
        self.keys = _cat(self.keys, kv_quantize(kt, c.bits, c.group_size))
        self.values = _cat(self.values, kv_quantize(values.contiguous(), c.bits, min(c.group_size, d)))
        self.length += n

    def dequantize_keys(self, dtype: torch.dtype) -> Tensor:
        c = self.config
        packed, scale, zero = self.keys
        b, h, nblk, d, _ = packed.shape
        kt = kv_dequantize(packed, scale, zero, c.bits, c.group_size)  # [B, H, nblk, D, G]
        return kt.transpose(-1, -2).reshape(b, h, nblk * c.group_size, d).to(dtype)

    def dequantize_values(self, dtype: torch.dtype) -> Tensor:
        c = self.config
        packed, scale, zero = self.values
        d = packed.shape[-1] * 8 // c.bits
        return kv_dequantize(packed, scale, zero, c.bits, min(c.group_size, d)).to(dtype)

    def with_residual(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Every stored token in full precision: the dequantized codes, then the residual ``keys`` /
        ``values``. For float32 these are views of the shared scratch buffers, overwritten by the next
        layer's call: consume them before then (attention does)."""
        if keys.dtype != torch.float32:
            return (
                torch.cat([self.dequantize_keys(keys.dtype), keys], dim=-2),
                torch.cat([self.dequantize_values(values.dtype), values], dim=-2),
            )
        c, nq = self.config, self.length
        stored = nq + keys.shape[-2]
        k, v = self._scratch("keys", keys, stored), self._scratch("values", values, stored)
        kv_dequantize_into(*self.keys, c.bits, c.group_size, True, k[:, :, :nq])
        d = values.shape[-1]
        kv_dequantize_into(*self.values, c.bits, min(c.group_size, d), False, v[:, :, :nq])
        k[:, :, nq:].copy_(keys)
        v[:, :, nq:].copy_(values)
        return k, v

    def _scratch(self, name: str, like: Tensor, stored: int) -> Tensor:
        """A [B, H, stored, D] view of the shared buffer ``name``, grown in steps of 256 tokens."""
        b, h, _, d = like.shape
        buf = self.scratch.get(name)
        if (
            buf is None
            or buf.shape[:2] != like.shape[:2]
            or buf.shape[3] != d
            or buf.shape[2] < stored
            or buf.device != like.device
        ):
            cap = -(-(stored + stored // 8) // 256) * 256
            buf = torch.empty(b, h, cap, d, dtype=torch.float32, device=like.device)
            self.scratch[name] = buf
        return buf[:, :, :stored]

    def attend(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
        """Softmax attention of one query token per row over the codes and then the residual
        ``keys``/``values`` (``infertrix::kivi_decode_attention``; nothing is dequantized).

        ``query`` [B, H_q, 1, D]; ``mask`` additive [B, stored] or None. Returns [B, 1, H_q, D], the
        layout transformers' attention functions return. Cost: one pass over the codes (bits/32 of
        a float32 cache) instead of writing and reading a dequantized copy.
        """
        out = kivi_decode_attention(
            query[:, :, 0], *self.keys, *self.values, keys, values, mask, self.config.bits, scaling
        )
        return out.unsqueeze(1)

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.keys is not None:
            self.keys = tuple(fn(t) for t in self.keys)
            self.values = tuple(fn(t) for t in self.values)

    def clear(self) -> None:
        self.keys = self.values = None
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.nbytes for store in (self.keys, self.values) if store is not None for t in store)
