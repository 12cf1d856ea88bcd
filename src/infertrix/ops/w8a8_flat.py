"""``infertrix::w8a8_flat_linear``: int8 weights x per-TENSOR static int8 activations, flattened.

FlattenQuant (Zhang et al. 2024, https://arxiv.org/abs/2402.17985): an input channel whose values
are too large for one per-tensor int8 step ``s`` is split into ``m`` channels carrying ``x / m``
each, the weight column repeated ``m`` times, so one static scale (calibrated) serves the whole
tensor. The ``m`` copies carry the same code, so their ``m`` products are ``m`` times one: the
weight keeps its ``[N, K]`` rows and the ``m - 1`` extra copies of each flattened channel are one
integer correction. With ``c_f = flat_index[0, f]`` the ``F`` flattened channels (increasing) and
``e_f = flat_index[1, f]`` their extra copies::

    q[m, k]    = clamp(round(x[m, k] * mult[0]), -127, 127)              (mult[0] = 1 / s)
    q[m, c_f]  = clamp(round(x[m, c_f] * mult[1 + f]), -127, 127)        (mult[1 + f] = 1 / (m_f s))
    acc[m, n]  = sum_k q[m, k] * qweight[n, k]                           (int32, exact)
               + sum_f (e_f * q[m, c_f]) * flat_columns[f, n]
    y[m, n]    = (float(acc[m, n]) * act_scale) * scale[n]  (+ bias[n])

which is exactly the product of the flattened codes with the repeated columns (integer sums in
any order are the same). ``qweight`` is int8 ``[N, K]`` (codes in [-127, 127]: the W8A8 kernel's
blocks multiply it, rows as long as the float layer's), ``act_scale`` float32 ``[1]`` (``s``),
``mult`` float32 ``[1 + F]``, ``flat_index`` int64 ``[2, F]`` (``e_f`` at most 258: ``e_f * q`` is
an int16), ``flat_columns`` int8 ``[ceil(N / 16), ceil(F / 2), 16, 2]``: the flattened channels'
weight columns ``qweight[:, c_f]`` in tiles of 16 outputs, ``flat_columns[t, p, i, j]`` = column
``2p + j`` at output ``16t + i`` (zeros past ``F`` and ``N``), so the correction reads them in one
sequential stream, a channel pair per int16 multiply-add. A call reads the weights, ``x``, the ``F`` columns and ``O(F)`` more: no per-channel
array of size ``K``. A row's result never depends on the other rows (no per-call statistics at
all, unlike per-token quantization). Compiled kernel: ``csrc/cpu/w8a8_linear.cpp`` (the W8A8
blocks after a one-pass quantization with no max search), bit-identical to the reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op
from .w8a8 import MAX_IN_FEATURES, check_codes

MAX_EXTRA = 32767 // 127  # copies beyond the first whose multiplier (copies * code) is an int16


def pair_columns(columns: Tensor) -> Tensor:
    """``[F, N]`` columns as the kernel's tiles ``[ceil(N / 16), ceil(F / 2), 16, 2]`` (zeros padded)."""
    f, n = columns.shape
    padded = columns.new_zeros(f + f % 2, -(-n // 16) * 16)
    padded[:f, :n] = columns
    return padded.view(-1, 2, padded.shape[1] // 16, 16).permute(2, 0, 3, 1).contiguous()


def unpair_columns(tiles: Tensor, f: int, n: int) -> Tensor:
    """The ``[F, N]`` columns of :func:`pair_columns`'s tiles."""
    return tiles.permute(1, 3, 0, 2).reshape(2 * tiles.shape[1], 16 * tiles.shape[0])[:f, :n]


def flat_quantize_reference(x: Tensor, mult: Tensor, channels: Tensor) -> Tensor:
    """int8 codes ``[rows, K]`` of ``x`` (``[..., K]``): one static multiplier, the flattened channels' own."""
    xf = x.float().reshape(-1, x.shape[-1])
    q = torch.round(xf * mult[0])
    q[:, channels] = torch.round(xf[:, channels] * mult[1:])
    return q.clamp_(-127, 127).to(torch.int8)


def check_flat_inputs(x: Tensor, qweight: Tensor, scale: Tensor, act_scale: Tensor, mult: Tensor, flat_index: Tensor,
                      flat_columns: Tensor, bias: Tensor | None) -> None:
    """Raise the kernel's errors for inputs it cannot take (shapes and dtypes; shared with the fake)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w8a8_flat_linear expects float32, bfloat16 or float16 activations, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"w8a8_flat_linear expects an int8 weight [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_flat_linear: x [..., {x.shape[-1]}] needs a weight [N, {x.shape[-1]}]; "
                         f"got {tuple(qweight.shape)}")
    if act_scale.dtype != torch.float32 or act_scale.numel() != 1:
        raise ValueError(f"w8a8_flat_linear: act_scale must be float32 [1], got {act_scale.dtype} {tuple(act_scale.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"w8a8_flat_linear: scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w8a8_flat_linear: bias must be [{n}], got {tuple(bias.shape)}")
    f = flat_index.shape[1] if flat_index.dim() == 2 else -1
    if (flat_index.dtype != torch.int64 or f < 0 or flat_index.shape[0] != 2 or flat_columns.dtype != torch.int8
            or tuple(flat_columns.shape) != (-(-n // 16), (f + 1) // 2, 16, 2)
            or mult.dtype != torch.float32 or tuple(mult.shape) != (1 + f,)):
        raise ValueError(f"w8a8_flat_linear: F flattened channels need int64 flat_index [2, F], int8 flat_columns "
                         f"[{-(-n // 16)}, ceil(F / 2), 16, 2] and float32 mult [1 + F]; got flat_columns {flat_columns.dtype} "
                         f"{tuple(flat_columns.shape)}, flat_index {flat_index.dtype} {tuple(flat_index.shape)}, "
                         f"mult {mult.dtype} {tuple(mult.shape)}")


def flat_index_problem(flat_index: Tensor, k: int, min_extra: int = 0) -> str | None:
    """What is wrong with ``flat_index`` [2, F] for ``k`` input channels (None: nothing): its channels
    must increase within [0, k), its extra copies lie in [min_extra, MAX_EXTRA]."""
    channels, extra = flat_index[0], flat_index[1]
    if channels.numel() and (int(channels[0]) < 0 or int(channels[-1]) >= k or bool((channels.diff() <= 0).any())):
        return f"flat_index[0] must hold increasing channels in [0, {k})"
    if extra.numel() and (int(extra.min()) < min_extra or int(extra.max()) > MAX_EXTRA):
        return f"flat_index[1] (copies beyond the first) must be in [{min_extra}, {MAX_EXTRA}]"
    return None


def w8a8_flat_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, act_scale: Tensor, mult: Tensor,
                               flat_index: Tensor, flat_columns: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (acc * act_scale) * scale (+ bias), acc the int32 product of the flattened int8 x and the weights."""
    check_flat_inputs(x, qweight, scale, act_scale, mult, flat_index, flat_columns, bias)
    n, k = qweight.shape
    channels, extra = flat_index[0], flat_index[1]
    problem = flat_index_problem(flat_index, k)
    if problem is not None:
        raise ValueError(f"w8a8_flat_linear: {problem}")
    width = k + int(extra.sum())
    if width > MAX_IN_FEATURES:
        raise ValueError(f"w8a8_flat_linear: {width} flattened input channels could overflow the int32 sum "
                         f"(at most {MAX_IN_FEATURES})")
    check_codes(qweight, "w8a8_flat_linear: weight")
    q = flat_quantize_reference(x, mult, channels).to(torch.float64)
    corr = q[:, channels] * extra.to(torch.float64)
    cols = unpair_columns(flat_columns, channels.numel(), n)
    acc = q @ qweight.to(torch.float64).t() + corr @ cols.to(torch.float64)  # exact: |acc| < 2**31
    y = (acc.to(torch.int32).to(torch.float32) * act_scale) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


w8a8_flat_linear = torch.library.custom_op("infertrix::w8a8_flat_linear", mutates_args=())(w8a8_flat_linear_reference)


@w8a8_flat_linear.register_fake
def _(x, qweight, scale, act_scale, mult, flat_index, flat_columns, bias=None):
    check_flat_inputs(x, qweight, scale, act_scale, mult, flat_index, flat_columns, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


register_op("w8a8_flat_linear", w8a8_flat_linear_reference)
