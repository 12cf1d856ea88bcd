"""W4A16: weight-only int4 (round-to-nearest or GPTQ), float activations.

The weight-only baseline of the quant family (GPTQ: Frantar et al. 2023,
https://arxiv.org/abs/2210.17323; group-wise asymmetric int4 as in AWQ/torchao's
``Int4WeightOnlyConfig``). Weights are quantized with plain float group scales and zero points
(``quantize_int4(two_level=False)``, or GPTQ with the same parameters) and multiplied by PyTorch's
own CPU int4 kernel, ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (dequantizes in registers;
activations stay float). That kernel needs ``in_features`` to be a multiple of the group size, and
group sizes 32/64/128/256: a layer whose ``in_features`` is not a multiple of ``group_size`` uses
the largest of those that divides it (SmolLM2's 576 with group 128 -> 64); the report lists them.
The op runs in bfloat16 (activations converted in and out, scales stored in bfloat16): that is its
fast path; with float32 activations it is several times slower than float32 ``F.linear``.
Lossy (weights only, plus bfloat16 rounding of activations and scales); needs no data unless
``gptq=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .gptq import gptq_int4
from .int4 import Int4Weights, quantize_int4
from .linear_base import QuantizedLinear
from .transform import QuantTransform

TORCH_GROUPS = (256, 128, 64, 32)
INNER_K_TILES = 2
PACK_BLOCK_N = 64  # output channels per block of torch's CPU int4pack layout
COMPUTE_DTYPE = torch.bfloat16  # what torch's int4 CPU op is fast with


def layer_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` if the kernel accepts it for this layer, else the largest group it accepts."""
    wanted = in_features if group_size == -1 else group_size
    for g in TORCH_GROUPS:
        if g <= wanted and in_features % g == 0:
            return g
    raise ConfigError(
        f"W4A16 needs in_features to be a multiple of 32 (torch's int4 kernel), got {in_features}; "
        "exclude this layer with filter_fn or use W4A8"
    )


class W4A16Linear(QuantizedLinear, kind="w4a16"):
    """int4 weights (torch's CPU int4pack layout) x float activations.

    Buffers: ``qweight`` uint8 ``[N, K/2]`` (``aten._convert_weight_to_int4pack_for_cpu``'s
    layout), ``scales_and_zeros`` bfloat16 ``[K/group_size, N, 2]`` (scale and offset: w = (q - 8)
    x scale + offset), ``bias``."""

    kernel = "aten::_weight_int4pack_mm_for_cpu"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        if group_size not in TORCH_GROUPS or in_features % group_size:
            raise ConfigError(f"W4A16Linear: group_size must be one of {TORCH_GROUPS} dividing in_features")
        if out_features % 8 or in_features % (INNER_K_TILES * 16):
            raise ConfigError(
                f"W4A16Linear needs out_features % 8 == 0 and in_features % 32 == 0 (torch's int4 kernel), got "
                f"{out_features}x{in_features}; exclude this layer with filter_fn or use W4A8"
            )
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=COMPUTE_DTYPE)
        )

    @classmethod
    def from_int4(cls, w: Int4Weights, bias: Tensor | None, dtype: torch.dtype) -> W4A16Linear:
        n, k = w.q.shape
        mod = cls(k, n, w.group_size, bias is not None, dtype)
        mod.qweight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), INNER_K_TILES))
        step = w.scale[:, None] * w.group_scale.float()  # [N, G]
        zero = 8 if w.zero is None else w.zero.float()
        # torch's convention: w = (q - 8) * scale + zero_offset
        offset = (8 - zero) * step
        mod.scales_and_zeros.copy_(torch.stack([step.t(), offset.t()], dim=-1))
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def _fused(cls, mods: Sequence[W4A16Linear]) -> W4A16Linear | None:
        """One group size, output sizes in whole blocks of 64 channels: torch's CPU int4pack layout
        packs the weights in blocks of 64 output channels (a shorter last block differs), so whole
        blocks concatenated compute each module's outputs bit for bit."""
        first = mods[0]
        if any(m.group_size != first.group_size or m.dtype != first.dtype or m.out_features % PACK_BLOCK_N
               for m in mods):
            return None
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.group_size, first.bias is not None,
                    first.dtype)
        fused._share_rows(mods, "qweight")
        fused.scales_and_zeros = torch.cat([m.scales_and_zeros for m in mods], dim=1)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_spec(self) -> dict:
        return {"group_size": self.group_size}


@register_transform("w4a16")
@dataclass
class W4A16(QuantTransform):
    """Weight-only int4 with float group scales and zero points (RTN, or GPTQ with ``gptq=True``).

    Fields (and QuantTransform's): group_size 32/64/128/256 or -1 (the largest accepted group that
    divides in_features); symmetric: no zero points; mse_clip: search each group's clipping range;
    act_order: with gptq, quantize columns by decreasing activation energy (GPTQ's desc_act).
    """
    use_when = "weight memory matters and activations must stay float: 4-bit weights dequantized per call; gptq=true for quality"

    primary: ClassVar[str | None] = "group_size"

    group_size: int = 128
    symmetric: bool = False
    mse_clip: bool = False
    act_order: bool = False

    def validate(self) -> None:
        super().validate()
        if self.group_size not in (*TORCH_GROUPS, -1):
            raise ConfigError(f"W4A16 group_size must be one of {TORCH_GROUPS} or -1, got {self.group_size}")

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return ("its weights live in torch's int4pack tiles, which infertrix does not cut into shards (and a "
                "row-parallel shard of a float-activation kernel would all-reduce rounded bfloat16 partials); "
                "use w4a8 or w8a8(smooth_alpha=none) under tp_plan")

    def quantize_linear(self, linear: nn.Linear, weight: Tensor, hessian: Tensor | None) -> nn.Module:
        gs = layer_group_size(linear.in_features, self.group_size)
        if hessian is not None:
            w = gptq_int4(weight, hessian, gs, self.symmetric, self.damp, two_level=False, act_order=self.act_order,
                          mse_clip=self.mse_clip)
        else:
            w = quantize_int4(weight, gs, self.symmetric, two_level=False, mse_clip=self.mse_clip)
        return W4A16Linear.from_int4(w, linear.bias, linear.weight.dtype)

    def extra_report(self) -> dict[str, Any]:
        return {"scheme": f"int4 weight-only (group {self.group_size}), float activations",
                "kernel": "aten._weight_int4pack_mm_for_cpu (torch)"}
