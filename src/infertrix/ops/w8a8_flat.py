"""``infertrix::w8a8_flat_linear``: int8 weights x per-TENSOR static int8 activations, flattened.

FlattenQuant (Zhang et al. 2024, https://arxiv.org/abs/2402.17985): an input channel whose values
are too large for one per-tensor int8 step ``s`` is split into ``m`` channels carrying ``x / m``
each, the weight column repeated ``m`` times, so one static scale (calibrated) serves the whole
tensor. The ``m`` copies carry the same code, so their ``m`` products are ``m`` times one: the
weight keeps one column per channel, and a flattened channel's activation is ``m`` times its code.

The op takes ``scales``, one float32 vector: a table ``flat`` ``[1 + F, 3]`` (row 0 ``(s, 1 / s,
0)``, then per flattened channel, increasing, ``(c_f, e_f, mult_f)``: the channel, its copies
beyond the first, ``m_f = 1 + e_f`` at most 128, and ``mult_f = 1 / (m_f s)``) followed by the
weight's per-channel ``scale`` ``[N]`` (:func:`pack_scales`): one tensor a call reads, where
separate small tensors each cost a chain of cold reads in a decode step. The weight's columns are
permuted so the flattened channels come first (:func:`flat_permutation`: ``swap(f, c_f)`` for
``f = 0 .. F - 1`` in turn; ``qweight[:, j]`` is the layer's column ``perm[j]``)::

    q[m, k]    = clamp(round(x[m, k] * (1 / s)), -127, 127)
    q[m, c_f]  = clamp(round(x[m, c_f] * mult_f), -127, 127)
    a[m, k]    = q[m, k],   a[m, c_f] = m_f * q[m, c_f]                    (|a| <= 128 * 127)
    acc[m, n]  = sum_j a[m, perm[j]] * qweight[n, j]                       (int32, exact)
    y[m, n]    = (float(acc[m, n]) * s) * scale[n]  (+ bias[n])

which is exactly the product of the flattened codes with the repeated columns (integer sums in
any order are the same). ``qweight`` is int8 ``[N, K]`` (codes in [-127, 127]: the W8A8 kernel's
blocks multiply it). The compiled kernel (``csrc/cpu/w8a8_linear.cpp``) writes the codes with 0 in
the flattened channels' first ``F`` positions and their values ``a`` in a short int16 row of their
own, multiplied (int16 x int16) by the first ``F`` columns of the same weight rows as the blocks
read them: a call streams exactly ``w8a8_linear``'s weight bytes and reads ``x`` and the ``O(F)``
table besides, in the tensor of the scales (no per-channel array of size ``K``; no max search
over the row). A row's result never depends on the other rows (no per-call statistics at all,
unlike per-token quantization). Bit-identical to the reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op
from .w8a8 import MAX_IN_FEATURES, check_codes

MAX_EXTRA = 127  # copies beyond the first: (1 + extra) * 127 <= 128 * 127 fits the kernel's int16


def flat_table(step: float, channels: Tensor, extra: Tensor) -> Tensor:
    """The float32 ``flat`` table ``[1 + F, 3]`` for static step ``step`` and flattened ``channels``
    (increasing) with ``extra`` copies beyond the first; multipliers rounded once from float64."""
    rows = [[step, 1.0 / step, 0.0]] + [[float(c), float(e), 1.0 / (step * (1 + int(e)))]
                                  for c, e in zip(channels.tolist(), extra.tolist(), strict=True)]
    return torch.tensor(rows, dtype=torch.float64).float()


def flat_permutation(channels: Tensor, k: int) -> Tensor:
    """int64 ``[k]``: ``perm[j]`` is the layer's input channel at the kernel's position ``j`` (the
    flattened ``channels`` moved to the front: ``swap(f, channels[f])`` in turn)."""
    perm = list(range(k))
    for f, c in enumerate(channels.tolist()):
        perm[f], perm[c] = perm[c], perm[f]
    return torch.tensor(perm, dtype=torch.long)


def split_table(flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``flat``'s parts: step ``[1]``, 1 / step ``[1]``, channels and extra copies (int64 ``[F]``),
    their multipliers ``[F]``."""
    return flat[0, :1], flat[0, 1:2], flat[1:, 0].long(), flat[1:, 1].long(), flat[1:, 2]


def pack_scales(flat: Tensor, scale: Tensor) -> Tensor:
    """The op's ``scales``: the ``flat`` table ``[1 + F, 3]`` then the weight scales ``[N]``, float32."""
    return torch.cat([flat.reshape(-1), scale]).float()


def unpack_scales(scales: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Views of ``scales`` for ``n`` outputs: the table ``[1 + F, 3]`` and the weight scales ``[n]``."""
    t = scales.numel() - n
    return scales[:t].view(t // 3, 3), scales[t:]


def flat_quantize_reference(x: Tensor, flat: Tensor) -> Tensor:
    """The activations ``a`` (float64 ``[rows, K]``, the layer's channel order) of ``x`` (``[..., K]``):
    int8 codes at one static multiplier, the flattened channels' at their own times their copies."""
    _, inv, channels, extra, mult = split_table(flat)
    xf = x.float().reshape(-1, x.shape[-1])
    q = torch.round(xf * inv)
    q[:, channels] = torch.round(xf[:, channels] * mult)
    a = q.clamp_(-127, 127).double()
    a[:, channels] *= (1 + extra).double()
    return a


def check_flat_inputs(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
    """Raise the kernel's errors for inputs it cannot take (shapes and dtypes; shared with the fake)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w8a8_flat_linear expects float32, bfloat16 or float16 activations, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"w8a8_flat_linear expects an int8 weight [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_flat_linear: x [..., {x.shape[-1]}] needs a weight [N, {x.shape[-1]}]; "
                         f"got {tuple(qweight.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w8a8_flat_linear: bias must be [{n}], got {tuple(bias.shape)}")
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.numel() < n + 3 or (scales.numel() - n) % 3:
        raise ValueError(f"w8a8_flat_linear: scales must be float32 [3 (1 + F) + {n}] (the flat table [1 + F, 3]: "
                         "(step, 1 / step, 0), then (channel, extra copies, multiplier) per flattened channel; then "
                         f"the weight scales), got {scales.dtype} {tuple(scales.shape)}")


def flat_problem(flat: Tensor, k: int, min_extra: int = 0) -> str | None:
    """What is wrong with ``flat`` for ``k`` input channels (None: nothing): the step, its inverse
    and the multipliers must be finite and positive, the channels increasing integers in [0, k),
    the extra copies integers in [min_extra, MAX_EXTRA]."""
    channels, extra = flat[1:, 0], flat[1:, 1]
    if not (bool(torch.isfinite(flat[0, :2]).all()) and bool((flat[0, :2] > 0).all())):
        return "flat's step and its inverse must be finite and positive"
    if not (bool(torch.isfinite(flat[1:, 2]).all()) and bool((flat[1:, 2] > 0).all())):
        return "flat's multipliers must be finite and positive"
    if channels.numel() and (bool((channels != channels.floor()).any()) or float(channels[0]) < 0
                             or float(channels[-1]) >= k or bool((channels.diff() <= 0).any())):
        return f"flat's channels must be increasing integers in [0, {k})"
    if extra.numel() and (bool((extra != extra.floor()).any()) or float(extra.min()) < min_extra
                          or float(extra.max()) > MAX_EXTRA):
        return f"flat's extra copies must be integers in [{min_extra}, {MAX_EXTRA}]"
    return None


def w8a8_flat_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (acc * s) * scale (+ bias), acc the int32 product of the flattened int8 x and the weights."""
    check_flat_inputs(x, qweight, scales, bias)
    n, k = qweight.shape
    flat, scale = unpack_scales(scales, n)
    problem = flat_problem(flat, k)
    if problem is not None:
        raise ValueError(f"w8a8_flat_linear: {problem}")
    step, _, channels, extra, _ = split_table(flat)
    width = k + int(extra.sum())
    if width > MAX_IN_FEATURES:
        raise ValueError(f"w8a8_flat_linear: {width} flattened input channels could overflow the int32 sum "
                         f"(at most {MAX_IN_FEATURES})")
    check_codes(qweight, "w8a8_flat_linear: weight")
    a = flat_quantize_reference(x, flat)[:, flat_permutation(channels, k)]
    acc = a @ qweight.to(torch.float64).t()  # exact: |acc| < 2**31
    y = (acc.to(torch.int32).to(torch.float32) * step) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


w8a8_flat_linear = torch.library.custom_op("infertrix::w8a8_flat_linear", mutates_args=())(w8a8_flat_linear_reference)


@w8a8_flat_linear.register_fake
def _(x, qweight, scales, bias=None):
    check_flat_inputs(x, qweight, scales, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


register_op("w8a8_flat_linear", w8a8_flat_linear_reference)
