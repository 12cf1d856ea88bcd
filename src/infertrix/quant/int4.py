"""Two-level int4 weight quantization (QServe's progressive group quantization, Lin et al. 2024).

A weight matrix ``w [N, K]`` becomes 4-bit codes ``q`` with a float scale per output channel and a
small unsigned integer scale per group of ``group_size`` input channels::

    w[n, k] ~= scale[n] * group_scale[n, g] * (q[n, k] - zero[n, g])       q, zero in 0..15

Integer group scales let the W4A8 kernel accumulate the whole K dimension in int32 and apply one
float scale at the end. Each group's ideal step ``f = range / levels`` is written as
``scale[n] * group_scale`` with ``scale[n] = max_g f / s2max`` and ``group_scale = ceil(f / scale)``
(rounded up, so the group's range is always covered: the codes never clip). ``s2max`` is the
largest value for which no int32 sum can overflow (``infertrix.ops.w4a8.max_group_scale``; 255 for
K <= 4400). Symmetric: ``zero = 8`` and ``f = absmax / 7``; with zero points: ``f = (max - min) / 15``
over the range extended to include 0. The last group may be shorter (SmolLM2's 576 = 4 x 128 + 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.transform import ConfigError
from ..ops.w4a8 import max_group_scale, num_groups


def check_group_size(group_size: int) -> None:
    if group_size != -1 and (group_size <= 0 or group_size % 8):
        raise ConfigError(
            f"group_size must be -1 (per output channel) or a positive multiple of 8 such as 32, 64 "
            f"or 128; got {group_size}"
        )


@dataclass
class Int4Weights:
    """Codes and scales of one quantized matrix, in plain [N, K] / [N, G] form."""

    q: Tensor  # uint8 [N, K], 0..15
    scale: Tensor  # float32 [N]
    group_scale: Tensor  # int32 [N, G], 1..s2max (float32 when single-level: scale is then all ones)
    zero: Tensor | None  # int32 [N, G], 0..15; None = symmetric (zero 8)
    group_size: int

    def dequantize(self) -> Tensor:
        k = self.q.shape[1]
        gidx = group_index(k, self.group_size, self.q.device)
        z = 8 if self.zero is None else self.zero[:, gidx].float()
        step = self.scale[:, None] * self.group_scale[:, gidx].float()
        return step * (self.q.float() - z)


def group_index(in_features: int, group_size: int, device=None) -> Tensor:
    k = torch.arange(in_features, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """[N, K] -> [N, G, gs], padding the last group by repeating its last element (min/max safe)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g = num_groups(k, group_size)
    pad = g * gs - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.view(n, g, gs)


def group_steps(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Ideal float step per group [N, G] and, with zero points, the group minimum [N, G]."""
    wg = _grouped(w.float(), group_size)
    if symmetric:
        return (wg.abs().amax(-1) / 7).clamp_min(1e-12), None
    lo = wg.amin(-1).clamp_max(0)
    hi = wg.amax(-1).clamp_min(0)
    return ((hi - lo) / 15).clamp_min(1e-12), lo


def channel_scale(steps: Tensor, in_features: int, symmetric: bool) -> Tensor:
    """The float per-channel scale for ideal group steps [N, G]."""
    return steps.amax(-1) / max_group_scale(in_features, not symmetric)


def integer_group_params(
    steps: Tensor, lo: Tensor | None, scale: Tensor, s2max: int | None
) -> tuple[Tensor, Tensor | None]:
    """Integer group scales (rounded up) and zero points for given float channel scales.

    ``s2max=None`` means single-level scales (weight-only W4A16): the group scale is the float
    step itself and ``scale`` is all ones.
    """
    if s2max is None:
        s2 = steps
    else:
        s2 = torch.ceil(steps / scale[:, None] * (1 - 1e-6)).clamp(1, s2max)
    zero = None
    if lo is not None:
        zero = torch.round(-lo / (scale[:, None] * s2)).clamp(0, 15).to(torch.int32)
    return (s2 if s2max is None else s2.to(torch.int32)), zero


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def group_params(
    w: Tensor, group_size: int, symmetric: bool, scale: Tensor, s2max: int | None, mse_clip: bool
) -> tuple[Tensor, Tensor | None]:
    """Group scales and zero points [N, G] for ``w`` given the channel ``scale``.

    ``mse_clip``: shrink each group's range by the factor of ``CLIP_GRID`` that minimises the
    group's squared rounding error (the "mse" range search of GPTQ's and AWQ's quantizers): a few
    clipped outliers for a finer step everywhere else. No data needed.
    """
    steps, lo = group_steps(w, group_size, symmetric)
    if not mse_clip:
        return integer_group_params(steps, lo, scale, s2max)
    wg = _grouped(w.float(), group_size)
    n, g, gs = wg.shape
    k = w.shape[1]
    valid = (torch.arange(g * gs, device=w.device) < k).view(1, g, gs)
    best_err = torch.full((n, g), float("inf"), device=w.device)
    best_s2 = best_z = None
    for r in CLIP_GRID:
        s2, z = integer_group_params(steps * r, None if lo is None else lo * r, scale, s2max)
        step = (scale[:, None] * s2.float())[..., None]
        zz = torch.full_like(step, 8.0) if z is None else z.float()[..., None]
        q = quantize_codes(wg, step, zz)
        err = (((q - zz) * step - wg) ** 2 * valid).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s2 = s2 if best_s2 is None else torch.where(better, s2, best_s2)
        if z is not None:
            best_z = z if best_z is None else torch.where(better, z, best_z)
    return best_s2, best_z


def quantize_codes(w: Tensor, step: Tensor, zero: Tensor | float) -> Tensor:
    """Round ``w`` to codes 0..15 with per-element ``step`` and ``zero`` (broadcast)."""
    return (torch.round(w / step) + zero).clamp(0, 15)


def quantize_int4(
    w: Tensor, group_size: int = 128, symmetric: bool = False, two_level: bool = True, mse_clip: bool = False
) -> Int4Weights:
    """Round-to-nearest int4 quantization of ``w [N, K]`` (no data needed).

    ``two_level=False`` gives plain float group scales (for weight-only kernels); ``mse_clip``
    searches each group's clipping range (see :func:`group_params`).
    """
    check_group_size(group_size)
    if w.dim() != 2:
        raise ValueError(f"quantize_int4 expects a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    n, k = w.shape
    steps, _ = group_steps(w, group_size, symmetric)
    if two_level:
        scale = channel_scale(steps, k, symmetric)
        s2max = max_group_scale(k, not symmetric)
    else:
        scale, s2max = torch.ones(n, device=w.device), None
    s2, zero = group_params(w, group_size, symmetric, scale, s2max, mse_clip)
    gidx = group_index(k, group_size, w.device)
    step = scale[:, None] * s2[:, gidx].float()
    z = 8 if zero is None else zero[:, gidx].float()
    q = quantize_codes(w, step, z).to(torch.uint8)
    return Int4Weights(q, scale.contiguous(), s2, zero, group_size)
