"""``infertrix::w8a8_flat_linear``: int8 weights x per-TENSOR static int8 activations, flattened.

FlattenQuant (Zhang et al. 2024, https://arxiv.org/abs/2402.17985): an input channel whose values
are too large for one per-tensor int8 step is split into ``m`` channels carrying ``x / m`` each,
the weight column repeated ``m`` times, so one static scale ``act_scale`` (calibrated) serves the
whole tensor. The copies are appended after the ``K`` original channels::

    q[m, k]      = clamp(round(x[m, k] * act_mult[k]), -127, 127)      k < K (act_mult = 1 / (m_k s))
    q[m, K + e]  = q[m, flat_src[e]]                                   the extra copies
    acc[m, n]    = sum_k q[m, k] * qweight[n, k]                       (int32, exact, k < K + E)
    y[m, n]      = (float(acc[m, n]) * act_scale) * scale[n]  (+ bias[n])

``qweight`` is int8 ``[N, K + E]`` (codes in [-127, 127]: the W8A8 kernel's blocks multiply it),
``act_mult`` float32 ``[K]``, ``act_scale`` float32 ``[1]``, ``flat_src`` int64 ``[E]``. A row's
result never depends on the other rows (no per-call statistics at all, unlike per-token
quantization). Compiled kernel: ``csrc/cpu/w8a8_linear.cpp`` (the W8A8 blocks after a one-pass
quantization with no max search), bit-identical to the reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op
from .w8a8 import MAX_IN_FEATURES, check_codes


def flat_quantize_reference(x: Tensor, act_mult: Tensor, flat_src: Tensor) -> Tensor:
    """int8 codes ``[rows, K + E]`` of ``x`` (``[..., K]``): static per-channel multipliers, copies appended."""
    k = act_mult.numel()
    q = torch.round(x.float().reshape(-1, k) * act_mult).clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, q[:, flat_src]], dim=1)


def w8a8_flat_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, act_mult: Tensor, act_scale: Tensor,
                               flat_src: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (acc * act_scale) * scale (+ bias), acc the int32 product of the flattened int8 x and the weights."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w8a8_flat_linear expects float32, bfloat16 or float16 activations, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"w8a8_flat_linear expects an int8 weight [N, K + E], got {qweight.dtype} {tuple(qweight.shape)}")
    n, kw = qweight.shape
    k = act_mult.numel()
    if x.shape[-1] != k or kw != k + flat_src.numel():
        raise ValueError(f"w8a8_flat_linear: x [..., {k}] and {flat_src.numel()} copies need a weight [N, "
                         f"{k + flat_src.numel()}]; got x {tuple(x.shape)}, weight {tuple(qweight.shape)}")
    if kw > MAX_IN_FEATURES:
        raise ValueError(f"w8a8_flat_linear: {kw} input channels could overflow the int32 sum (at most {MAX_IN_FEATURES})")
    check_codes(qweight, "w8a8_flat_linear: weight")
    q = flat_quantize_reference(x, act_mult, flat_src)
    acc = (q.to(torch.float64) @ qweight.to(torch.float64).t()).to(torch.int32)  # exact: |acc| < 2**31
    y = (acc.to(torch.float32) * act_scale) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


w8a8_flat_linear = torch.library.custom_op("infertrix::w8a8_flat_linear", mutates_args=())(w8a8_flat_linear_reference)


@w8a8_flat_linear.register_fake
def _(x, qweight, scale, act_mult, act_scale, flat_src, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


register_op("w8a8_flat_linear", w8a8_flat_linear_reference)
