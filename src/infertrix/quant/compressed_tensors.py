"""Our quantized modules as compressed-tensors tensors and schemes (the format vLLM loads).

compressed-tensors (https://github.com/vllm-project/compressed-tensors, the format llm-compressor
writes) stores a quantized linear layer as integer codes ``q`` and a float ``weight_scale`` (and an
integer ``weight_zero_point`` when asymmetric) with ``w = (q - zero_point) * weight_scale``, codes
signed (int4 in [-8, 7]). Read from compressed-tensors 0.20's source: ``int-quantized`` keeps the
codes as an int8 ``weight``; ``pack-quantized`` packs 4-bit codes eight to an int32
(``weight_packed`` [N, K/8], ``weight_shape``; an asymmetric zero point is packed along the output
dimension); ``channel`` scales are [N, 1], ``group`` scales [N, K/group_size] with K a multiple of
the group size. Each kind maps as follows:

- ``w8a8``: int-quantized, int8 channel weights, dynamic per-token int8 activations; the codes and
  scales as they are (exact).
- ``w4a16``: pack-quantized int4 groups, float activations. Symmetric: exact. With zero points our
  kernel stores a bfloat16 offset ``(8 - zero) * step`` beside the step; the format keeps the
  integer zero point, so the exported weight is ``(q - zero) * step``, off ours by the offset's
  bfloat16 rounding (at most half a bfloat16 ulp of the offset).
- ``w4a8``: int-quantized int4 codes in int8 (what vLLM's W4A8 int scheme reads), dynamic per-token
  int8 activations. Our two-level scale ``scale[n] * group_scale[g, n]`` becomes one float scale
  per group, the product our own dequantization computes (exact in float32; the integer structure
  the int32-accumulating kernel relies on is not kept). A group size that does not divide K (our
  last group may be shorter) is written as the largest group dividing both, scales repeated (exact).
  SqueezeLLM outliers have no place in the format and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.transform import ConfigError
from .linear_base import QuantizedLinear


@dataclass
class Converted:
    """One module in the format: its scheme (JSON-able), its storage format and its local tensors."""

    scheme: dict[str, Any]
    format: str
    tensors: dict[str, Tensor]
    exact: bool  # decompresses to exactly our dequantized weight


def _args(bits: int, symmetric: bool, group_size: int | None = None) -> dict[str, Any]:
    if group_size is None or group_size == -1:
        return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "channel", "dynamic": False}
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
            "group_size": group_size, "dynamic": False}


TOKEN_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def convert(module: QuantizedLinear, name: str) -> Converted:
    """``module`` in compressed-tensors form; raises ConfigError for what the format cannot carry."""
    kind = module.kind
    if kind == "w8a8":
        return _w8a8(module)
    if kind == "w4a16":
        return _w4a16(module)
    if kind == "w4a8":
        return _w4a8(module, name)
    raise ConfigError(f"{name} is a {kind!r} module; the compressed-tensors export carries w8a8, w4a16 and w4a8")


def _with_bias(module: QuantizedLinear, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    if module.bias is not None:
        tensors["bias"] = module.bias.detach()
    return tensors


def _w8a8(m: QuantizedLinear) -> Converted:
    t = {"weight": m.qweight.clone(), "weight_scale": m.scale[:, None].to(m.dtype)}
    return Converted({"weights": _args(8, True), "input_activations": TOKEN_INT8}, "int-quantized",
                     _with_bias(m, t), exact=m.dtype == torch.float32)


def int4pack_codes(qweight: Tensor, out_features: int, in_features: int) -> Tensor:
    """The codes (0..15, uint8 [N, K]) in torch's CPU int4pack layout ``qweight``.

    That layout depends on the CPU torch runs on (its packer interleaves rows per vector width),
    so it is read by probing the packer itself: codes holding the base-16 digits of each
    element's index, packed, tell where every element lands.
    """
    total = out_features * in_features
    index = torch.arange(total, dtype=torch.int64)
    source = torch.zeros(total, dtype=torch.int64)
    for d in range(max(1, math.ceil(math.log(total, 16)))):
        digit = ((index >> (4 * d)) & 15).to(torch.int32).view(out_features, in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
        nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).flatten().to(torch.int64)
        source |= nibbles << (4 * d)
    codes = torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten()
    out = torch.empty(total, dtype=torch.uint8)
    out[source] = codes
    return out.view(out_features, in_features)


def _pack(codes: Tensor, packed_dim: int = 1) -> Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes.to(torch.int8), 4, packed_dim=packed_dim)


def _w4a16(m: QuantizedLinear) -> Converted:
    n, k = m.out_features, m.in_features
    q = int4pack_codes(m.qweight, n, k).to(torch.int16)
    step = m.scales_and_zeros[..., 0].t().float()  # [N, G]
    offset = m.scales_and_zeros[..., 1].t().float()
    symmetric = bool((offset == 0).all())
    t = {"weight_packed": _pack(q - 8), "weight_scale": step.to(m.dtype), "weight_shape": torch.tensor([n, k])}
    if not symmetric:
        zero = torch.round(8 - offset / step).clamp(0, 15)
        t["weight_zero_point"] = _pack(zero - 8, packed_dim=0)
    return Converted({"weights": _args(4, symmetric, m.group_size)}, "pack-quantized", _with_bias(m, t),
                     exact=symmetric and m.dtype in (torch.float32, torch.bfloat16))  # bf16 steps


def _w4a8(m: QuantizedLinear, name: str) -> Converted:
    if m.outlier_values is not None:
        raise ConfigError(f"{name} keeps SqueezeLLM outliers (outlier_fraction > 0), which compressed-tensors cannot "
                          "carry; quantize with outlier_fraction=0 to export")
    w = m.int4_weights()
    k = m.in_features
    step = w.scale[:, None] * w.group_scale.float()  # [N, G]: the product our dequantize() uses
    zero = w.zero
    group = m.group_size
    if group != -1 and k % group:
        sub = math.gcd(group, k)  # whole sub-groups tile both the full groups and the short last one
        owner = torch.arange(k // sub) * sub // group
        step, zero, group = step[:, owner], None if zero is None else zero[:, owner], sub
    t = {"weight": (w.q.to(torch.int16) - 8).to(torch.int8), "weight_scale": step.to(m.dtype)}
    if zero is not None:
        t["weight_zero_point"] = (zero - 8).to(torch.int8)
    return Converted({"weights": _args(4, zero is None, group), "input_activations": TOKEN_INT8}, "int-quantized",
                     _with_bias(m, t), exact=m.dtype == torch.float32)
