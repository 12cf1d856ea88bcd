"""FlattenQuant: per-TENSOR static int8 activations after flattening the large channels.

FlattenQuant (Zhang et al. 2024, https://arxiv.org/abs/2402.17985): per-tensor activation
quantization fails on LLMs because a few input channels carry values far above the rest, and one
scale must cover them. Splitting such a channel ``c`` into ``m_c = ceil(max|x_c| / T)`` channels
that each carry ``x_c / m_c`` (its weight column repeated ``m_c`` times; the product is unchanged)
brings every channel under a threshold ``T``, so one static step ``T / 127`` serves the tensor.
Here the threshold is the smallest that keeps the extra channels of a layer within
``flatten_budget`` of its input width (at most ``max_copies`` per channel), from the per-channel
maxima of the calibration windows after SmoothQuant smoothing (the paper smooths first too).

Cost and guarantee: lossy (8-bit weights and activations, values beyond the calibrated range are
clipped); the int8 weight grows by the copied columns (at most ``flatten_budget``); the activation
quantizer needs no per-token max search and a row's result never depends on the other rows.
Needs calibration data (16 windows of 256 tokens by default). Measured on SmolLM2: docs/quant.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from ..ops.w8a8 import check_codes
from .calibration import InputStats
from .linear_base import QuantizedLinear
from .w8a8 import W8A8, quantize_int8_per_channel


def flatten_plan(absmax: Tensor, budget: float, max_copies: int) -> tuple[float, Tensor]:
    """The smallest threshold ``T`` whose copies ``ceil(absmax / T)`` (capped at ``max_copies``) add
    at most ``budget * K`` channels, and those copy counts (int64 ``[K]``, 1 = not flattened)."""
    a = absmax.double().clamp_min(1e-8)
    top = a.max().item()
    extra = int(budget * a.numel())

    def copies(t: float) -> Tensor:
        return torch.ceil(a / t).clamp(1, max_copies).long()

    lo, hi = top / max_copies, top  # copies(hi) adds nothing; below lo the cap clips the largest channel
    if int((copies(lo) - 1).sum()) <= extra:
        return lo, copies(lo)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if int((copies(mid) - 1).sum()) <= extra else (mid, hi)
    return hi, copies(hi)


class FlattenLinear(QuantizedLinear, kind="w8a8_flat"):
    """int8 weights (per channel, flattened columns appended) x per-tensor static int8 activations.

    Buffers: ``qweight`` int8 ``[N, K + E]``, ``scale`` float32 ``[N]``, ``act_mult`` float32 ``[K]``
    (1 / (step * copies)), ``act_scale`` float32 ``[1]`` (the step), ``flat_src`` int64 ``[E]`` (the
    source channel of each appended copy), ``bias``; see ``infertrix.ops.w8a8_flat``."""

    kernel = "infertrix::w8a8_flat_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 extra_channels: int = 0):
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features + extra_channels, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("act_mult", torch.zeros(in_features, dtype=torch.float32))
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("flat_src", torch.zeros(extra_channels, dtype=torch.long))

    @property
    def extra_channels(self) -> int:
        return self.flat_src.numel()

    def extra_spec(self) -> dict[str, Any]:
        return {"extra_channels": self.extra_channels}

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, threshold: float, copies: Tensor,
                   hessian: Tensor | None = None, damp: float = 0.01) -> FlattenLinear:
        """Flatten ``weight`` ([N, K], float) for per-channel ``copies`` and quantize it (GPTQ with a Hessian)."""
        n, k = weight.shape
        src = torch.repeat_interleave(torch.arange(k), copies - 1)
        q, scale = quantize_int8_per_channel(weight.float(), hessian, damp)
        mod = cls(k, n, bias is not None, dtype, extra_channels=src.numel())
        mod.qweight.copy_(torch.cat([q, q[:, src]], dim=1))
        mod.scale.copy_(scale)
        step = threshold / 127
        mod.act_scale.fill_(step)
        mod.act_mult.copy_((1.0 / (step * copies.double())).float())
        mod.flat_src.copy_(src)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.infertrix.w8a8_flat_linear.default(
            x, self.qweight, self.scale, self.act_mult, self.act_scale, self.flat_src, self.bias)

    def check_loaded(self, name: str) -> None:
        check_codes(self.qweight, f"{name}.qweight")


@register_transform("flattenquant")
@dataclass
class FlattenQuant(W8A8):
    """FlattenQuant W8A8: int8 per-channel weights, per-tensor static int8 activations, large
    channels flattened (arXiv:2402.17985); SmoothQuant smoothing first (``smooth_alpha``, 0.5).

    Fields (besides W8A8's): flatten_budget: extra input channels a layer may gain, as a fraction of
    its input width; max_copies: most channels one channel is split into.
    """
    use_when = "int8 activations with ONE static scale per tensor (no per-token statistics), within ~1% of per-token W8A8"

    primary: ClassVar[str | None] = "flatten_budget"
    kernel_op: ClassVar[str] = "w8a8_flat_linear"

    flatten_budget: float = 0.02
    max_copies: int = 64

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.flatten_budget <= 1.0:
            raise ConfigError(f"flatten_budget must be in [0, 1] (a fraction of the input width), got {self.flatten_budget}")
        if self.max_copies < 1:
            raise ConfigError(f"max_copies must be at least 1, got {self.max_copies}")

    @property
    def calibrated(self) -> bool:
        return True  # the static activation scale comes from the calibration windows

    def _calibration_name(self) -> str:
        return "+".join(["FlattenQuant activation ranges", super()._calibration_name()]).rstrip("+")

    def _no_data(self) -> str:
        return ", or quantize without data with per-token activations: recipe 'w8a8(smooth_alpha=none)'"

    def quantize_with_stats(self, linear: nn.Linear, weight: Tensor, stats: InputStats | None) -> QuantizedLinear:
        if stats is None or stats.tokens == 0:
            raise ConfigError("FlattenQuant needs the calibration maxima of every layer's inputs; this layer saw none")
        threshold, copies = flatten_plan(stats.absmax, self.flatten_budget, self.max_copies)
        return FlattenLinear.from_float(weight, linear.bias, linear.weight.dtype, threshold, copies,
                                        stats.hessian, self.damp)

    def extra_report(self) -> dict[str, Any]:
        return {"scheme": "int8 per-channel weights x int8 per-tensor static activations, large channels flattened",
                "matmul": "infertrix::w8a8_flat_linear"}

