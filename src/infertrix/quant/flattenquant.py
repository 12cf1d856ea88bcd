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
clipped); the weight is stored once (its columns reordered, the flattened channels first) with an
``O(F)`` table beside it, so a call reads what per-token W8A8 reads; the activation quantizer needs
no per-token max search and a row's result never depends on the other rows.
Needs calibration data (16 windows of 256 tokens by default). Measured on SmolLM2: docs/quant.md.
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
from ..ops.w8a8_flat import (
    MAX_EXTRA,
    flat_permutation,
    flat_problem,
    flat_table,
    pack_scales,
    split_table,
    unpack_scales,
)
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
    """int8 weights (per channel) x per-tensor static int8 activations, large channels flattened.

    Buffers: ``qweight`` int8 ``[N, K]`` (its columns permuted so the ``F`` flattened channels come
    first: ``flat_permutation``), ``scales`` float32 ``[3 (1 + F) + N]``: the table :attr:`flat`
    ``[1 + F, 3]`` (the static step and its inverse, then each flattened channel, its extra copies
    and multiplier) followed by the per-channel weight :attr:`scale`; ``bias``. See
    ``infertrix.ops.w8a8_flat``."""

    kernel = "infertrix::w8a8_flat_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 flattened: int = 0, **legacy: Any):
        if "extra_channels" in legacy or "flat_channels" in legacy:
            raise ConfigError("this FlattenQuant checkpoint has a weight layout of an earlier infertrix (before "
                              "2026-12-05 18:00 UTC), which this version no longer reads; quantize the float model "
                              "again with 'flattenquant' and save it")
        if legacy:
            raise TypeError(f"FlattenLinear got unexpected arguments {sorted(legacy)}")
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # from_float or loading fills it
        self.register_buffer("scales", torch.zeros(3 * (1 + flattened) + out_features, dtype=torch.float32))

    @property
    def flat(self) -> Tensor:
        """The table ``[1 + F, 3]`` at the head of ``scales`` (a view)."""
        return unpack_scales(self.scales, self.out_features)[0]

    @property
    def scale(self) -> Tensor:
        """The per-channel weight scales ``[N]`` at the tail of ``scales`` (a view)."""
        return unpack_scales(self.scales, self.out_features)[1]

    @property
    def extra_channels(self) -> int:
        """Input channels the flattening adds (the copies beyond each channel's first)."""
        return int(self.flat[1:, 1].sum())

    def extra_spec(self) -> dict[str, Any]:
        return {"flattened": self.flat.shape[0] - 1}

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, threshold: float, copies: Tensor,
                   hessian: Tensor | None = None, damp: float = 0.01) -> FlattenLinear:
        """Quantize ``weight`` ([N, K], float; GPTQ with a Hessian) for per-channel ``copies`` (int64 [K])."""
        n, k = weight.shape
        flat = torch.nonzero(copies > 1).flatten()
        q, scale = quantize_int8_per_channel(weight.float(), hessian, damp)
        mod = cls(k, n, bias is not None, dtype, flattened=flat.numel())
        mod.qweight.copy_(q[:, flat_permutation(flat, k)])
        mod.scales.copy_(pack_scales(flat_table(threshold / 127, flat, copies[flat] - 1), scale))
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def kernel_args(self, x: Tensor) -> tuple:
        """The arguments of ``infertrix::w8a8_flat_linear`` for ``x``, in its order."""
        b = self._buffers  # one dict, not nn.Module.__getattr__ per buffer (a decode step's layers are cold)
        return x, b["qweight"], b["scales"], b["bias"]

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.infertrix.w8a8_flat_linear.default(*self.kernel_args(x))

    @classmethod
    def _fused(cls, mods: Sequence[FlattenLinear]) -> FlattenLinear | None:
        """Projections of one input (q/k/v, gate/up) share its calibration, so the same step and
        flattened channels (so the same column order): they fuse when those are equal; otherwise
        None. The fused module's weight rows are views of theirs; its ``scales`` a new vector (4
        bytes an output)."""
        first = mods[0]
        if not all(torch.equal(m.flat, first.flat) for m in mods[1:]):
            return None
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None, first.dtype,
                    flattened=first.flat.shape[0] - 1)
        fused._share_rows(mods, "qweight")
        fused.scales = pack_scales(first.flat, torch.cat([m.scale for m in mods]))
        return fused

    def check_loaded(self, name: str) -> None:
        check_codes(self.qweight, f"{name}.qweight")
        problem = flat_problem(self.flat, self.in_features, min_extra=1)  # a flattened channel has copies
        if problem is not None:
            raise ConfigError(f"{name}: {problem}")
        step, inv, _, extra, mult = split_table(self.flat.double())
        if not (torch.allclose(inv * step, torch.ones(1, dtype=torch.float64), rtol=1e-5, atol=0)
                and torch.allclose(mult, inv / (1 + extra), rtol=1e-5, atol=0)):
            raise ConfigError(f"{name}: flat's multipliers do not match its step and copies; the checkpoint was "
                              "changed after saving, save it again from the optimized model")


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
        if not 1 <= self.max_copies <= MAX_EXTRA + 1:
            raise ConfigError(f"max_copies must be in [1, {MAX_EXTRA + 1}] (a flattened channel's value, "
                              f"copies x code, is an int16 in the kernel), got {self.max_copies}")

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

