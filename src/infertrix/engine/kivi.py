"""KIVI layers on the engine: a one-token step of a layer that holds KIVI codes.

``infertrix::engine_layer`` attends over full-precision buffers only; a layer whose older tokens
sit in KIVI's 2/4-bit codes (``kvcache/kivi_store.py``) runs the same ops one by one instead
(projections, q/k norms, rotary, the append into the full-precision residual; an MoE layer's
block as on the engine's other steps, ``moe.py``), with
``infertrix::kivi_decode_attention`` reading the codes and the residual in one pass, as KIVI's own
attention function does on the module path (Liu et al. 2024, https://arxiv.org/abs/2402.02750).
That kernel takes one query per row, so windows of several tokens over codes (speculative
verification) take the module path (``cache.storage_problem``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kvcache.cache import EvictingLayer
from ..ops.engine import _group
from .moe import moe_tail

_ops = torch.ops.infertrix


def reads_codes(layer: object) -> bool:
    """True when ``layer`` holds KIVI codes (its step runs :func:`kivi_step`)."""
    return isinstance(layer, EvictingLayer) and layer.n_quantized > 0


def _mask(layer: EvictingLayer, pads: Tensor) -> Tensor | None:
    """The additive [B, stored] mask hiding each row's kept pads and lead fillers (its first stored slots)."""
    stored = layer.stored_length
    start = layer.first_slots(pads)
    if start is None:
        return None
    slots = torch.arange(stored, device=pads.device)
    hidden = slots[None] < start[:, None]
    return torch.zeros(hidden.shape, dtype=torch.float32, device=pads.device).masked_fill_(hidden, float("-inf"))


def kivi_step(h: Tensor, a: Tensor, lp, layer: EvictingLayer, cos: Tensor, sin: Tensor, positions: Tensor,
              pads: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """One decoder layer (``lp``: its ``LayerPlan``) for one new token per row over ``layer``'s codes
    and residual; returns (h', next_norm(h')) as ``engine_layer`` does."""
    tensors, ints, floats = lp.tensors, lp.ints, lp.floats
    heads, kvh, d, n_qkv, n_gu = ints[:5]
    qkv = _group(tensors, ints, 0, n_qkv, a).view(batch, 1, heads + 2 * kvh, d)
    if tensors[2] is not None:
        q = _ops.rope(_ops.rms_norm(qkv[:, :, :heads], tensors[2], floats[3]), cos, sin, positions)
        k = _ops.rope(_ops.rms_norm(qkv[:, :, heads : heads + kvh], tensors[3], floats[4]), cos, sin, positions)
    else:
        qk = _ops.rope(qkv[:, :, : heads + kvh], cos, sin, positions)
        q, k = qk[:, :, :heads], qk[:, :, heads:]
    empty = a.new_empty(batch, kvh, 0, d)
    index = layer.reserve(1, empty, empty)
    _ops.kv_append(layer.kbuf, layer.vbuf, k.contiguous(), qkv[:, :, heads + kvh :].contiguous(), index)
    layer.commit(1)
    codes = layer.codes
    o = _ops.kivi_decode_attention(q[:, 0].contiguous(), *codes.keys, *codes.values, layer.keys, layer.values,
                                   _mask(layer, pads), codes.config.bits, floats[0])
    h2, a2 = _ops.add_rms_norm(_group(tensors, ints, n_qkv, 1, o.reshape(batch, heads * d)), h, tensors[0], floats[1])
    if lp.mlp is not None:  # an MoE layer: its block as on the engine's other steps (moe.py)
        return moe_tail(h2, a2, lp, batch)
    mlp = _group(tensors, ints, n_qkv + 1 + n_gu, 1, _ops.silu_mul(_group(tensors, ints, n_qkv + 1, n_gu, a2)))
    return _ops.add_rms_norm(mlp, h2, tensors[1], floats[2])
