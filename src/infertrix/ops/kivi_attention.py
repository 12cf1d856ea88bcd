"""``infertrix::kivi_decode_attention``: one decode step of attention read straight from KIVI codes.

KIVI (Liu et al. 2024, https://arxiv.org/abs/2402.02750) keeps old keys in 2/4-bit codes per channel
(one scale and zero per block of ``G`` tokens and channel), old values per token (one scale and zero
per group of channels), and the most recent tokens in full precision. Dequantizing every stored
token before attention costs more memory traffic than the full cache it replaces; this op never
materialises them. With ``k = c * s + z`` per block and channel, a query's score of a token is
``sum_d (q_d s_d) c_d + sum_d q_d z_d``, and with ``v = c * s + z`` per token and group the output is
``sum_t (p_t s_t) c_t + sum_t p_t z_t``: the codes are read once, scaled by a per-block or per-token
factor, and the query heads of a GQA group share each read.

Cost per step and KV head: one pass over the codes (bits/32 of the float32 cache) plus the residual;
no allocation beyond the [B, H_q, S] scores. Exact up to float32 rounding against dequantize, then
softmax attention (the reference below).

Compiled kernel: ``csrc/cpu/kivi_attention.cpp`` (AVX-512, scalar).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kv_cache_ops import kv_dequantize_reference
from .registry import register_op


def kivi_decode_attention_reference(
    query: Tensor,
    key_codes: Tensor,
    key_scale: Tensor,
    key_zero: Tensor,
    value_codes: Tensor,
    value_scale: Tensor,
    value_zero: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor | None,
    bits: int,
    scaling: float,
) -> Tensor:
    """Attention of one query token per row over KIVI codes then a full-precision residual.

    ``query`` [B, H_q, D] (H_q a multiple of H); keys as ``kv_quantize`` stores them per channel:
    codes [B, H, S_q/G, D, G*bits/8], scale and zero [B, H, S_q/G, D]; values per token: codes
    [B, H, S_q, D*bits/8], scale and zero [B, H, S_q, D/group]; residual ``keys``/``values``
    [B, H, R, D]; ``mask`` an additive float [B, S_q + R] (0 or -inf) or None. Returns [B, H_q, D]
    in the query's dtype: softmax(q k^T * scaling + mask) v over the S_q + R tokens.
    """
    b, hq, d = query.shape
    h, nblk, g = key_codes.shape[1], key_codes.shape[2], key_codes.shape[-1] * 8 // bits
    if hq % h or key_codes.shape[3] != d or keys.shape[-1] != d:
        raise ValueError(
            f"kivi_decode_attention: query [B, H_q, D] {tuple(query.shape)} does not match key codes "
            f"{tuple(key_codes.shape)} and residual keys {tuple(keys.shape)}"
        )
    kq = kv_dequantize_reference(key_codes, key_scale, key_zero, bits, g)  # [B, H, nblk, D, G]
    kq = kq.transpose(-1, -2).reshape(b, h, nblk * g, d)
    vgroup = d // value_scale.shape[-1]
    vq = kv_dequantize_reference(value_codes, value_scale, value_zero, bits, vgroup)
    k = torch.cat([kq, keys.float()], dim=2)
    v = torch.cat([vq, values.float()], dim=2)
    q = query.float().reshape(b, h, hq // h, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, G, S]
    if mask is not None:
        scores = scores + mask.float()[:, None, None, :]
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(b, hq, d).to(query.dtype)


kivi_decode_attention = torch.library.custom_op(
    "infertrix::kivi_decode_attention", mutates_args=()
)(kivi_decode_attention_reference)


@kivi_decode_attention.register_fake
def _(query: Tensor, *codes_residual_mask, **kwargs) -> Tensor:
    return torch.empty_like(query)


register_op("kivi_decode_attention", kivi_decode_attention_reference)
