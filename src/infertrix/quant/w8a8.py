"""W8A8: int8 per-channel weights x int8 per-token activations (SmoothQuant, Xiao et al. 2023).

SmoothQuant: https://arxiv.org/abs/2211.10438. Weights are symmetric int8 with one float scale per
output channel; activations are quantized per token at run time; the product accumulates in int32
and one float scale per row and per channel is applied at the end, all in one op,
``infertrix::w8a8_linear`` (compiled: one pass over the int8 weights for decoding's few rows,
``torch._int_mm`` for more). ``smooth_alpha`` (default 0.5, the paper's value) migrates activation
outliers into the weights, folded into the preceding norms, as in the paper; it needs a few
calibration samples (``smooth_alpha=None`` needs none). Lossy; 8 bits per weight. GPTQ
(``gptq=True``) is accepted too and compensates the int8 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from ..ops.w8a8 import check_codes
from .gptq import inverse_hessian_factor
from .linear_base import QuantizedLinear
from .transform import QuantTransform


def quantize_int8_per_channel(w: Tensor, hessian: Tensor | None = None, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes [N, K] and scales [N]; with a Hessian, GPTQ error compensation."""
    w = w.detach().float().clone()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
    if hessian is None:
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
    hinv, dead = inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0
    q = torch.empty_like(w, dtype=torch.int8)
    k = w.shape[1]
    for i1 in range(0, k, 128):
        i2 = min(i1 + 128, k)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            code = torch.round(w1[:, i] / scale).clamp(-127, 127)
            q[:, i1 + i] = code.to(torch.int8)
            e = (w1[:, i] - code * scale) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scale


class W8A8Linear(QuantizedLinear, kind="w8a8"):
    """int8 weights (per channel) x int8 per-token activations, int32 accumulation.

    Buffers: ``qweight`` int8 ``[N, K]`` (codes in [-127, 127], row-major as the float weight),
    ``scale`` float32 ``[N]``, ``bias``."""

    kernel = "infertrix::w8a8_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32))

    @classmethod
    def from_weight(cls, q: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> W8A8Linear:
        """From symmetric int8 codes ``q`` [N, K] (in -127..127, the range the kernel multiplies exactly)."""
        if q.dtype != torch.int8:
            raise ValueError(f"W8A8Linear needs int8 codes in [-127, 127] (symmetric quantization), got {q.dtype}")
        check_codes(q, "W8A8Linear.from_weight: q")
        mod = cls(q.shape[1], q.shape[0], bias is not None, dtype)
        mod.qweight.copy_(q)
        mod.scale.copy_(scale)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the compiled kernel multiplies exactly only codes in [-127, 127] (it negates weights)
        q = state_dict.get(prefix + "qweight")
        if q is not None and q.dtype == torch.int8:
            check_codes(q, f"{prefix}qweight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # one dict, not nn.Module.__getattr__ per buffer (a decode step's layers are cold)
        return torch.ops.infertrix.w8a8_linear.default(x, b["qweight"], b["scale"], b["bias"])

    def check_loaded(self, name: str) -> None:
        check_codes(self.qweight, f"{name}.qweight")

    def shard(self, dim: int, start: int, end: int) -> W8A8Linear:
        if dim == 0:
            bias = None if self.bias is None else self.bias[start:end]
            return W8A8Linear.from_weight(self.qweight[start:end], self.scale[start:end], bias, self.dtype)
        return W8A8Linear.from_weight(self.qweight[:, start:end], self.scale, None, self.dtype)

    def int8_accumulators(self, x_q: Tensor) -> Tensor:
        return torch._int_mm(x_q, self.qweight.t())

    @classmethod
    def _fused(cls, mods: Sequence[W8A8Linear]) -> W8A8Linear:
        first = mods[0]
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None, dtype=first.dtype)
        fused._share_rows(mods, "qweight")
        fused._share_rows(mods, "scale")
        return fused


@register_transform("w8a8", "smoothquant")
@dataclass
class W8A8(QuantTransform):
    """SmoothQuant W8A8: int8 per-channel weights, int8 per-token activations.

    Fields: those of QuantTransform; ``smooth_alpha`` defaults to 0.5 here (None: plain W8A8, no data).
    """
    use_when = "quality first with smaller, faster weights: int8 weights and activations after SmoothQuant, about 1% perplexity"

    primary: ClassVar[str | None] = "smooth_alpha"
    kernel_op: ClassVar[str] = "quantize_per_token_int8"

    smooth_alpha: float | None = 0.5

    def validate(self) -> None:
        super().validate()
        if self.window_tokens < 8:
            raise ConfigError("window_tokens must be at least 8")

    def quantize_linear(self, linear: nn.Linear, weight: Tensor, hessian: Tensor | None) -> nn.Module:
        q, scale = quantize_int8_per_channel(weight, hessian, self.damp)
        return W8A8Linear.from_weight(q, scale, linear.bias, linear.weight.dtype)

    def extra_report(self) -> dict[str, Any]:
        return {"scheme": "int8 per-channel weights x int8 per-token activations", "matmul": "infertrix::w8a8_linear"}
