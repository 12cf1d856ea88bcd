"""``infertrix::w4a8_linear`` and ``infertrix::w4a8_matmul_int32``: int8 activations x 4-bit weights.

The W4A8 scheme of QServe/QoQ (Lin et al. 2024, https://arxiv.org/abs/2405.04532) and QQQ (Zhang
et al. 2024, https://arxiv.org/abs/2406.09904): weights stored as 4-bit codes with *two-level*
scales, a float ``scale[n]`` per output channel times a small unsigned integer ``group_scale[g, n]``
per group of input channels, so that the whole K dimension accumulates in int32 and one float scale
is applied at the end::

    w[n, k]   ~= scale[n] * group_scale[g(k), n] * (q[n, k] - zero[g(k), n])     q, zero in 0..15
    acc[m, n]  = sum_k x_q[m, k] * group_scale[g(k), n] * (q[n, k] - zero[g(k), n])      (int32)
    y[m, n]    = (float(acc[m, n]) * x_scale[m]) * scale[n] (+ bias[n])

Symmetric weights have no ``zero`` tensor (``zero`` = 8 everywhere). Activations are quantized per
token (``infertrix::quantize_per_token_int8``), so a row's output never depends on the other rows.
The quantizer (``infertrix.quant``) chooses ``group_scale`` small enough that no int32 sum can
overflow (``max_group_scale``).

Packed layout (``pack_int4``): ``qweight`` is uint8 ``[P, S, 64]`` with ``P = ceil(N/16)`` panels of
16 output channels and ``S = ceil(K/8)`` steps of 8 input channels; byte ``4*c + j`` of
``qweight[p, s]`` holds ``q[16p + c, 8s + j]`` in its low nibble and ``q[16p + c, 8s + 4 + j]`` in its
high nibble (padding codes are 0). ``group_scale`` and ``zero`` are uint8 ``[G, 16 P]`` (group-major).
This is the storage format of :class:`infertrix.quant.W4A8Linear` too (one copy of the weights, in
the order the kernel streams them; :func:`unpack_int4` recovers ``q``).

Compiled kernel: ``csrc/cpu/w4a8_gemm.cpp`` (AVX-512 VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``, scalar),
int32 results bit-identical to the reference below, float outputs too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quantize import quantize_per_token_int8_reference
from .registry import register_op

PANEL = 16  # output channels per panel of the packed layout
STEP = 8  # input channels per 64-byte step


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    return (-(-out_features // PANEL), -(-in_features // STEP), 64)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along K (-1 = per channel: one group); the last group may be shorter."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def max_group_scale(in_features: int, zero_point: bool) -> int:
    """Largest integer group scale for which ``acc`` cannot overflow int32 (and that fits uint8).

    |x_q| <= 127 and |q - zero| <= 15 (8 when symmetric), so |acc| <= 127 * 15 * s2 * K.
    """
    span = 15 if zero_point else 8
    return int(max(1, min(255, (2**31 - 1) // (127 * span * max(in_features, 1)))))


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit codes ``q`` (uint8 [N, K], values 0..15) into the kernel layout [P, S, 64]."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D [out_features, in_features] tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    p, s, _ = packed_shape(n, k)
    full = torch.zeros(p * PANEL, s * STEP, dtype=torch.uint8, device=q.device)
    full[:n, :k] = q.to(torch.uint8)
    # [p, c, s, half, j] with k = 8 s + 4 half + j  ->  [p, s, c, j, half]
    full = full.view(p, PANEL, s, 2, 4).permute(0, 2, 1, 4, 3)
    return (full[..., 0] | (full[..., 1] << 4)).reshape(p, s, 64).contiguous()


def unpack_int4(qweight: Tensor, out_features: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the codes as uint8 [out_features, in_features]."""
    p, s, _ = qweight.shape
    b = qweight.view(p, s, PANEL, 4)
    halves = torch.stack((b & 0x0F, b >> 4), dim=-1)  # [p, s, c, j, half]
    full = halves.permute(0, 2, 1, 4, 3).reshape(p * PANEL, s * STEP)
    return full[:out_features, :in_features]


def pack_group_params(t: Tensor) -> Tensor:
    """[N, G] per-group integers -> the kernel's uint8 [G, 16 P] (channels padded with 0)."""
    n, g = t.shape
    out = torch.zeros(g, -(-n // PANEL) * PANEL, dtype=torch.uint8, device=t.device)
    out[:, :n] = t.t().to(torch.uint8)
    return out


def _group_index(in_features: int, group_size: int, device) -> Tensor:
    k = torch.arange(in_features, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def dequantize_int(
    qweight: Tensor, group_scale: Tensor, zero: Tensor | None, in_features: int, out_features: int, group_size: int
) -> Tensor:
    """The integer weights ``group_scale * (q - zero)`` as int64 [N, K] (no float scale)."""
    q = unpack_int4(qweight, out_features, in_features).to(torch.int64)
    gidx = _group_index(in_features, group_size, q.device)
    s2 = group_scale[:, :out_features].t().to(torch.int64)[:, gidx]
    z = 8 if zero is None else zero[:, :out_features].t().to(torch.int64)[:, gidx]
    return (q - z) * s2


def w4a8_matmul_int32_reference(
    x_q: Tensor,
    qweight: Tensor,
    group_scale: Tensor,
    zero: Tensor | None,
    in_features: int,
    out_features: int,
    group_size: int,
) -> Tensor:
    """int32 accumulators [M, N] of int8 activations x_q [M, K] times the packed 4-bit weights."""
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != in_features:
        raise TypeError(f"w4a8_matmul_int32: x_q must be int8 [M, {in_features}], got {x_q.dtype} {tuple(x_q.shape)}")
    w = dequantize_int(qweight, group_scale, zero, in_features, out_features, group_size)
    # float64 holds every partial sum exactly (|acc| < 2**31 by construction), in any order.
    return (x_q.to(torch.float64) @ w.to(torch.float64).t()).to(torch.int32)


def w4a8_linear_reference(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    group_scale: Tensor,
    zero: Tensor | None,
    in_features: int,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """y = (acc * x_scale) * scale (+ bias) with per-token int8 activations; x's dtype and shape[:-1]."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w4a8_linear expects float32, bfloat16 or float16 activations, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"w4a8_linear: last dimension of x must be in_features={in_features}, got {tuple(x.shape)}")
    n = scale.shape[0]
    x_q, x_scale = quantize_per_token_int8_reference(x.reshape(-1, in_features))
    acc = w4a8_matmul_int32_reference(x_q, qweight, group_scale, zero, in_features, n, group_size)
    y = acc.to(torch.float32) * x_scale
    y = y * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def w4a8_linear_argmax_reference(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    group_scale: Tensor,
    zero: Tensor | None,
    in_features: int,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """Each row's greedy token: ``argmax`` of w4a8_linear's float32 outputs (first index on ties),
    int64 of x's shape[:-1]; the kernel never writes the [M, N] outputs (a greedy LM head)."""
    y = w4a8_linear_reference(x.float(), qweight, scale, group_scale, zero, in_features, group_size, bias)
    return y.argmax(-1)


# The ops are the references themselves (one signature, one set of argument checks); compiled
# kernels (csrc/cpu/w4a8_gemm.cpp) register for the CPU key and take precedence.
w4a8_matmul_int32 = torch.library.custom_op("infertrix::w4a8_matmul_int32", mutates_args=())(
    w4a8_matmul_int32_reference
)
w4a8_linear = torch.library.custom_op("infertrix::w4a8_linear", mutates_args=())(w4a8_linear_reference)
w4a8_linear_argmax = torch.library.custom_op("infertrix::w4a8_linear_argmax", mutates_args=())(
    w4a8_linear_argmax_reference
)


@w4a8_matmul_int32.register_fake
def _(x_q, qweight, group_scale, zero, in_features, out_features, group_size):
    return x_q.new_empty((x_q.shape[0], out_features), dtype=torch.int32)


@w4a8_linear.register_fake
def _(x, qweight, scale, group_scale, zero, in_features, group_size, bias):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


@w4a8_linear_argmax.register_fake
def _(x, qweight, scale, group_scale, zero, in_features, group_size, bias):
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


register_op("w4a8_matmul_int32", w4a8_matmul_int32_reference)
register_op("w4a8_linear", w4a8_linear_reference)
register_op("w4a8_linear_argmax", w4a8_linear_argmax_reference)
