"""GPTQ error compensation for two-level int4 weights (Frantar et al. 2023, https://arxiv.org/abs/2210.17323).

Columns are quantized one by one; each column's rounding error, divided by the diagonal of the
upper Cholesky factor of the inverse Hessian ``H = X^T X`` (X: calibration inputs of the layer),
is spread over the columns not yet quantized, so the layer's *output* error on the calibration
data is minimised rather than the weight error. Group parameters are chosen from the updated
weights when the loop reaches each group (the reference implementation's ``static_groups=False``);
the per-channel float scale is fixed up front from the original weights, so the integer group
scales stay within the kernel's overflow bound. Cost: O(N K^2) per layer (about a second for a
SmolLM2 layer on two cores). Lossy; needs calibration data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.w4a8 import max_group_scale
from .int4 import (
    Int4Weights,
    channel_scale,
    check_group_size,
    group_params,
    group_steps,
    quantize_codes,
)


def inverse_hessian_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and the mask of dead inputs."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    for extra in (0.0, 1e-3, 1e-2, 1e-1):
        if extra:
            h.diagonal().add_(extra * torch.mean(torch.diag(h)))
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True).float(), dead


def gptq_int4(
    w: Tensor,
    h: Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    damp: float = 0.01,
    block: int = 128,
    two_level: bool = True,
    act_order: bool = False,
    mse_clip: bool = False,
) -> Int4Weights:
    """GPTQ-quantize ``w [N, K]`` given the input Hessian ``h [K, K]`` (sum of x x^T).

    ``two_level=False``: plain float group scales (weight-only W4A16). ``act_order``: quantize
    columns in order of decreasing Hessian diagonal (GPTQ's ``desc_act``), with group parameters
    fixed up front from the original weights (``static_groups``) so groups stay contiguous in the
    stored layout. ``mse_clip``: search each group's clipping range (see ``int4.group_params``).
    """
    check_group_size(group_size)
    w = w.detach().float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    steps0, _ = group_steps(w, group_size, symmetric)
    s1 = channel_scale(steps0, k, symmetric) if two_level else torch.ones(n)
    s2max = max_group_scale(k, not symmetric) if two_level else None
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    q = torch.zeros(n, k, dtype=torch.uint8)
    static = act_order
    if static:
        s2_all, z_all = group_params(w, group_size, symmetric, s1, s2max, mse_clip)
        gidx = torch.arange(k) // gs
        col_step = s1[:, None] * s2_all.float()[:, gidx]
        col_zero = torch.full((n, k), 8.0) if z_all is None else z_all.float()[:, gidx]
        perm = torch.argsort(torch.diag(h), descending=True)
        w, col_step, col_zero = w[:, perm], col_step[:, perm], col_zero[:, perm]
        h = h[perm][:, perm]
    else:
        perm = None
        block = gs if group_size != -1 else block  # blocks align with groups
        s2_all = torch.ones(n, groups, dtype=torch.int32 if two_level else torch.float32)
        z_all = None if symmetric else torch.zeros(n, groups, dtype=torch.int32)
    hinv, _ = inverse_hessian_factor(h, damp)
    step = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                step, zero = col_step[:, col], col_zero[:, col]
            elif col % gs == 0:
                g = col // gs
                # a group always starts a block, so w holds its up-to-date columns here
                s2, zp = group_params(w[:, col:min(col + gs, k)], -1, symmetric, s1, s2max, mse_clip)
                s2_all[:, g] = s2[:, 0]
                step = s1 * s2[:, 0].float()
                zero = torch.full((n,), 8.0) if zp is None else zp[:, 0].float()
                if z_all is not None:
                    z_all[:, g] = zp[:, 0]
            x = w1[:, i]
            code = quantize_codes(x, step, zero)
            q[:, col] = code.to(torch.uint8)
            deq = step * (code - zero)
            e = (x - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return Int4Weights(q, s1.contiguous(), s2_all, z_all, group_size)
