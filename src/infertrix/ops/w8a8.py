"""``infertrix::w8a8_linear``: int8 per-token activations x int8 per-channel weights (SmoothQuant's W8A8).

SmoothQuant (Xiao et al. 2023, https://arxiv.org/abs/2211.10438) stores each weight row as int8
codes with one float scale; activations are quantized per token at run time
(``infertrix::quantize_per_token_int8``), the product accumulates in int32 and the two scales
are applied at the end::

    acc[m, n] = sum_k x_q[m, k] * q[n, k]                       (int32, exact)
    y[m, n]   = (float(acc[m, n]) * x_scale[m]) * scale[n]  (+ bias[n])

``qweight`` is int8 ``[N, K]`` in the row-major order of a float weight, the storage of
:class:`infertrix.quant.W8A8Linear`, with codes in [-127, 127] (symmetric; the kernel moves the
activation's sign onto the weight, and -128 has no negation in int8). The reference raises on
-128; the compiled kernel does not scan the weights on every call, so ``W8A8Linear`` checks
once, when it is built (``from_weight``) and when a state dict is loaded. Compiled kernel:
``csrc/cpu/w8a8_linear.cpp`` (AVX-512 VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``, scalar) for a few
rows, one pass over the weights as in ``skinny_linear``; more rows go to ``torch._int_mm``.
Integer sums are exact, so the outputs are bit-identical to the reference below on every path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quantize import quantize_per_token_int8_reference
from .registry import register_op

MAX_ROWS = 32  # the compiled kernel's own loop up to this many rows (csrc/cpu/w8a8_linear.cpp kMaxRows)
MAX_IN_FEATURES = (2**31 - 1) // (127 * 127)  # |acc| <= 127 * 127 * K must fit int32


def check_codes(qweight: Tensor, name: str = "w8a8_linear: weight") -> None:
    """Raise if ``qweight`` holds the int8 code -128 (the kernel negates weights; see above)."""
    if bool((qweight == -128).any()):
        raise ValueError(f"{name} holds the int8 code -128; W8A8 weight codes must lie in [-127, 127] (symmetric)")


def w8a8_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (acc * x_scale) * scale (+ bias), acc the int32 product of per-token int8 x and int8 weights."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"w8a8_linear expects float32, bfloat16 or float16 activations, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"w8a8_linear expects an int8 weight [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_linear: last dimension of x must be in_features={k}, got {tuple(x.shape)}")
    check_codes(qweight)
    if k > MAX_IN_FEATURES:
        raise ValueError(f"w8a8_linear: in_features={k} could overflow the int32 sum (at most {MAX_IN_FEATURES})")
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"w8a8_linear: scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    x_q, x_scale = quantize_per_token_int8_reference(x.reshape(-1, k))
    # float64 holds every partial sum exactly (|acc| < 2**31), in any order
    acc = (x_q.to(torch.float64) @ qweight.to(torch.float64).t()).to(torch.int32)
    y = (acc.to(torch.float32) * x_scale) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# The op is the reference itself; the compiled kernel registers for the CPU key and takes precedence.
w8a8_linear = torch.library.custom_op("infertrix::w8a8_linear", mutates_args=())(w8a8_linear_reference)


@w8a8_linear.register_fake
def _(x, qweight, scale, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


register_op("w8a8_linear", w8a8_linear_reference)
