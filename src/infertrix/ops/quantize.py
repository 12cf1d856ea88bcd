"""``infertrix::quantize_per_token_int8``: dynamic symmetric int8 quantization per token.

Each row (token) of ``x`` gets its own scale ``absmax / 127``, so a row's result never depends on
the other rows in its batch (the per-token activation quantizer of SmoothQuant, Xiao et al.
2023, and of W4A8 schemes such as QQQ and QServe). Compiled kernel: ``csrc/cpu/quantize_per_token.cpp``
(AVX-512, AVX2, scalar), bit-identical to the reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op

MIN_AMAX = 1e-10


def quantize_per_token_int8_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: returns (q int8 with x's shape, scale float32 [..., 1])."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"quantize_per_token_int8 expects float32, bfloat16 or float16 input, got {x.dtype}"
        )
    xf = x.float()
    if x.shape[-1] == 0:
        return torch.empty_like(x, dtype=torch.int8), torch.full(
            (*x.shape[:-1], 1), MIN_AMAX / 127.0, dtype=torch.float32, device=x.device
        )
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX)
    # tensor / tensor is an exactly rounded IEEE division in torch; `127.0 / amax` is not (torch
    # turns a scalar numerator into reciprocal-times-scalar), and the kernels divide exactly.
    inv = torch.full_like(amax, 127.0) / amax
    q = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


@torch.library.custom_op("infertrix::quantize_per_token_int8", mutates_args=())
def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    return quantize_per_token_int8_reference(x)


@quantize_per_token_int8.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


register_op("quantize_per_token_int8", quantize_per_token_int8_reference)
