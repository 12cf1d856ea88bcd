"""``infertrix::skinny_linear``: a float32 linear layer for a few rows, one pass over the weights.

Decoding multiplies a handful of rows (one token per sequence, or a speculative verification
window of a few draft tokens) by each weight matrix: the weights cost far more than the
arithmetic, so the time should be one read of the weights whatever the number of rows. torch's
CPU GEMM does not behave so at 2 to 8 rows (on SmolLM2's layers it takes about twice its
one-row time), which makes a verification forward of width 4 cost about 1.5 plain decoding steps
and eats most of what speculative decoding gains on a CPU. The compiled kernel
(``csrc/cpu/skinny_linear.cpp``, AVX-512 / AVX2 / scalar) loads every weight once for all rows
(up to 32 rows; more rows, or other dtypes, go to ``torch.nn.functional.linear``).

Equal to the reference (``F.linear``) to float32 rounding, not bit for bit (another summation
order); a row's result is bitwise independent of the other rows of its batch (the order depends
only on the input size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register_op

MAX_ROWS = 32  # the compiled kernel's limit (csrc/cpu/skinny_linear.cpp kMaxRows)


def skinny_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias for x [..., K], weight [N, K]: torch's own linear."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"skinny_linear expects x [..., {weight.shape[-1]}] and weight [N, K], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    return F.linear(x, weight, bias)


skinny_linear = torch.library.custom_op("infertrix::skinny_linear", mutates_args=())(skinny_linear_reference)


@skinny_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_op("skinny_linear", skinny_linear_reference)
