"""KV-cache ops: gathering kept tokens into a compact cache, and KIVI-style KV quantization.

``infertrix::kv_gather``
    ``out[b, h, j, :] = x[b, h, index[b, h, j], :]``: copies the tokens an eviction policy keeps
    (per batch row and KV head) into a new, smaller cache, so evicting really frees memory.
``infertrix::kv_quantize`` / ``infertrix::kv_dequantize``
    Asymmetric min/max quantization of each group of ``group_size`` consecutive elements of the
    last dimension to 2 or 4 bits, packed little-end first into ``uint8`` (KIVI, Liu et al. 2024,
    https://arxiv.org/abs/2402.02750). Keys are quantized per channel by feeding the transposed
    block (rows = channels, elements = tokens), values per token (rows = tokens).
``infertrix::kv_dequantize_into``
    The same dequantization written in place into a [B, H, S, D] slice (keys transposed back to
    token-major), so decoding with a quantized cache allocates nothing per step.

Compiled kernels: ``csrc/cpu/kv_cache_ops.cpp`` (bit-identical to the references below).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op

MIN_SCALE = 1e-8


def kv_gather_reference(x: Tensor, index: Tensor) -> Tensor:
    """Gather tokens along dim 2: x [B, H, S, D], index int64 [B, H, K] -> [B, H, K, D]."""
    if x.dim() != 4 or index.dim() != 3 or index.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"kv_gather expects x [B, H, S, D] and index [B, H, K], got {tuple(x.shape)} and {tuple(index.shape)}"
        )
    if index.dtype != torch.int64:
        raise TypeError(f"kv_gather expects an int64 index, got {index.dtype}")
    return torch.gather(x, 2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


kv_gather = torch.library.custom_op("infertrix::kv_gather", mutates_args=())(kv_gather_reference)


@kv_gather.register_fake
def _(x: Tensor, index: Tensor) -> Tensor:
    return x.new_empty((*index.shape, x.shape[-1]))


def _check_quant_args(n: int, bits: int, group_size: int) -> None:
    if bits not in (2, 4):
        raise ValueError(f"kv_quantize supports bits=2 or 4, got {bits}")
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(
            f"kv_quantize: the last dimension ({n}) must be a multiple of group_size={group_size}"
        )
    if group_size % (8 // bits) != 0:
        raise ValueError(
            f"kv_quantize: group_size={group_size} must be a multiple of {8 // bits} for {bits}-bit packing"
        )


def kv_quantize_reference(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per-group quantization of the last dim: returns (packed uint8 [..., N*bits/8],
    scale float32 [..., N/group], zero float32 [..., N/group]) with x ~= q * scale + zero."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"kv_quantize expects float32, bfloat16 or float16 input, got {x.dtype}")
    n = x.shape[-1]
    _check_quant_args(n, bits, group_size)
    levels = (1 << bits) - 1
    g = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    mn = g.amin(dim=-1, keepdim=True)
    mx = g.amax(dim=-1, keepdim=True)
    # tensor / tensor is exactly rounded (a scalar divisor is not); the kernels divide the same way
    scale = ((mx - mn) / torch.full_like(mx, float(levels))).clamp_min(MIN_SCALE)
    q = torch.round((g - mn) / scale).clamp_(0, levels).to(torch.uint8)
    per = 8 // bits
    q = q.reshape(*x.shape[:-1], n // per, per)
    packed = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=x.device)
    for i in range(per):
        packed |= q[..., i] << (bits * i)
    return packed, scale.squeeze(-1), mn.squeeze(-1)


kv_quantize = torch.library.custom_op("infertrix::kv_quantize", mutates_args=())(kv_quantize_reference)


@kv_quantize.register_fake
def _(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, n * bits // 8), dtype=torch.uint8),
        x.new_empty((*lead, n // group_size), dtype=torch.float32),
        x.new_empty((*lead, n // group_size), dtype=torch.float32),
    )


def kv_dequantize_reference(
    packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int
) -> Tensor:
    """Inverse of kv_quantize: float32 [..., N] = q * scale + zero (a product, then a sum: two roundings)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"kv_dequantize expects uint8 packed codes, got {packed.dtype}")
    per = 8 // bits
    n = packed.shape[-1] * per
    _check_quant_args(n, bits, group_size)
    mask = (1 << bits) - 1
    q = torch.stack([(packed >> (bits * i)) & mask for i in range(per)], dim=-1)
    q = q.reshape(*packed.shape[:-1], n // group_size, group_size).float()
    out = q * scale.unsqueeze(-1) + zero.unsqueeze(-1)  # the kernels do the same two roundings
    return out.reshape(*packed.shape[:-1], n)


kv_dequantize = torch.library.custom_op("infertrix::kv_dequantize", mutates_args=())(kv_dequantize_reference)


@kv_dequantize.register_fake
def _(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int) -> Tensor:
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits), dtype=torch.float32)


def kv_dequantize_into_reference(
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int,
    per_channel: bool,
    out: Tensor,
) -> None:
    """Dequantize one layer's codes straight into ``out`` float32 [B, H, S, D] (e.g. a slice of a
    buffer reused across layers): keys (``per_channel``) packed [B, H, S/G, D, G*bits/8] with
    ``group_size`` = G, written transposed; values packed [B, H, S, D*bits/8]."""
    if out.dim() != 4 or out.dtype != torch.float32:
        raise ValueError(
            f"kv_dequantize_into expects a float32 out [B, H, S, D], got {out.dtype} {tuple(out.shape)}"
        )
    x = kv_dequantize_reference(packed, scale, zero, bits, group_size)
    if per_channel:
        b, h, nblk, d, g = x.shape
        x = x.transpose(-1, -2).reshape(b, h, nblk * g, d)
    if x.shape != out.shape:
        raise ValueError(
            f"kv_dequantize_into: codes of {tuple(x.shape)} do not match out {tuple(out.shape)}"
        )
    out.copy_(x)


kv_dequantize_into = torch.library.custom_op("infertrix::kv_dequantize_into", mutates_args=("out",))(
    kv_dequantize_into_reference
)


register_op("kv_gather", kv_gather_reference)
register_op("kv_quantize", kv_quantize_reference)
register_op("kv_dequantize", kv_dequantize_reference)
register_op("kv_dequantize_into", kv_dequantize_into_reference)
