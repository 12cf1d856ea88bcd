"""KIVI layers on the engine: a one-token step of a layer that holds KIVI codes.

``infertrix::engine_layer`` attends over full-precision buffers only; a layer whose older tokens
sit in KIVI's 2/4-bit codes (``kvcache/kivi_store.py``) takes ``infertrix::engine_kivi_layer``
instead: the same projections, q/k norms, rotary and append into the full-precision residual,
then ``infertrix::kivi_decode_attention`` reading the codes and the residual in one pass (as
KIVI's own attention function does on the module path; Liu et al. 2024,
https://arxiv.org/abs/2402.02750), then the rest of the layer, in one op call (C++ when the
extension is built). An MoE layer runs those ops one by one and then its block (``moe.py``).
Gemma 3 with KIVI codes is refused earlier (``transform.py``). The attention kernel takes one
query per row, so windows of several tokens over codes (speculative verification) take the module
path (``cache.storage_problem``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kvcache.cache import EvictingLayer
from ..ops.engine import _attention_out, _queries_keys_values
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
    and residual; returns (h', next_norm(h')) as ``engine_layer`` does. A dense layer is one
    ``infertrix::engine_kivi_layer`` call; an MoE layer runs its attention half as those ops one by
    one and then its block (``moe.py``)."""
    tensors, ints, floats = lp.tensors, lp.ints, lp.floats
    heads, kvh, d = ints[:3]
    if a.shape[0] != batch:  # checked before the layer commits a slot that nothing would write
        raise ValueError(f"the engine's KIVI step takes one new token per row, got {a.shape[0]} rows for {batch}")
    empty = a.new_empty(batch, kvh, 0, d)
    index = layer.reserve(1, empty, empty)  # the new token's residual slot (written by the op below)
    layer.commit(1)
    codes = layer.codes
    code_list, mask, bits = [*codes.keys, *codes.values], _mask(layer, pads), codes.config.bits
    length = layer.keys.shape[2]  # the residual's slots, the new one included: a prefix of kbuf
    if lp.mlp is None:
        return _ops.engine_kivi_layer(h, a, tensors, ints, floats, layer.kbuf, layer.vbuf, length, code_list, mask,
                                      bits, cos, sin, positions, index, batch)
    q, k, v = _queries_keys_values(a, tensors, ints, floats, cos, sin, positions, batch)
    _ops.kv_append(layer.kbuf, layer.vbuf, k, v, index)
    o = _ops.kivi_decode_attention(q[:, 0].contiguous(), *code_list, layer.kbuf[:, :, :length],
                                   layer.vbuf[:, :, :length], mask, bits, floats[0])
    return moe_tail(*_attention_out(h, o.reshape(batch, heads * d), tensors, ints, floats, (tensors[0], floats[1])),
                    lp, batch)
