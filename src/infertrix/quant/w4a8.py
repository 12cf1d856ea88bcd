"""W4A8: 4-bit weights, per-token int8 activations, int32 accumulation (QServe/QoQ, QQQ).

QServe/QoQ: Lin et al. 2024, https://arxiv.org/abs/2405.04532 (two-level "progressive" group
scales); QQQ: Zhang et al. 2024, https://arxiv.org/abs/2406.09904. Each selected ``nn.Linear``
becomes a :class:`~infertrix.quant.W4A8Linear` (plain buffers); the forward pass is one op,
``infertrix::w4a8_linear`` (AVX-512 VNNI / AVX2 / scalar C++ kernel). Lossy. Memory: about 4.1-4.5
bits per weight instead of 32 (float32). Round-to-nearest needs no data; ``gptq=True`` and
``smooth_alpha`` calibrate on a few real text samples (see :class:`~infertrix.quant.transform.QuantTransform`).

Defaults (chosen by measurement on SmolLM2, BENCHMARKS.md ``quant-defaults``, docs/quant.md): the
recipe ``w4a8`` is the best measured setting that needs no data: round-to-nearest, group 32 with
zero points and MSE clipping search, ``lm_head`` quantized too (perplexity +29%; the old group-128
default +55%). ``w4a8(gptq=true)`` calibrates: GPTQ with act_order on 8 x 256 tokens of the shipped
text, with the residual rotation (QuaRot/SpinQuant R1) where the architecture allows it (+8.5%,
45 s on two cores; a progress bar shows the layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .gptq import gptq_int4
from .int4 import check_group_size, quantize_int4
from .transform import QuantTransform
from .w4a8_linear import W4A8Linear, split_outliers


@register_transform("w4a8")
@dataclass
class W4A8(QuantTransform):
    """int4 weights x int8 per-token activations with two-level scales.

    Fields (and those of QuantTransform: filter_fn, smooth_alpha, gptq, tokenizer, ...):
      group_size: input channels per group: 32 (default), 64, 128 or -1 (one group per output
        channel); any positive multiple of 8 works. The last group may be shorter (576 = 4 x 128 + 64).
      symmetric: True = codes centred on 8, no zero points; False (default) = a 4-bit zero point
        per group, subtracted in the kernel as zero x the activation group sum.
      mse_clip: search each group's clipping range for the least squared error (no data needed;
        default True).
      rotate: "auto" here (default): rotate the residual stream with gptq=True where the
        architecture allows it (rotation hurts round-to-nearest: measured), else not, as
        ``describe()`` says; True rotates always and refuses unsupported models.
      quantize_lm_head: True here (default): the head is 16% of a float decode step on SmolLM2, and
        rotation unties a tied head (a float copy would outweigh the whole int4 model); False keeps
        the head float (SmolLM2: perplexity +22% instead of +29% without data).
      act_order: with gptq, quantize columns by decreasing activation energy (GPTQ's desc_act;
        default True, no effect without gptq).
      calibration_windows: windows of window_tokens tokens to calibrate on (default 8 x 256 here).
      outlier_fraction: SqueezeLLM's dense-and-sparse option (Kim et al. 2024,
        https://arxiv.org/abs/2306.07629): keep this fraction of the largest-magnitude weights
        (e.g. 0.005) exactly, in a float sparse side matrix added after the int kernel; 0 = off.
    """
    use_when = "decode speed and weight memory matter most on a CPU with int8 dot products: 4-bit weights, int8 activations; calibrate (gptq=true, rotate=true) to keep perplexity within a few percent"

    primary: ClassVar[str | None] = "group_size"
    kernel_op: ClassVar[str] = "w4a8_linear"
    bench_recipe: ClassVar[str] = "w4a8"  # what `infertrix bench --all-recipes` runs

    group_size: int = 32
    symmetric: bool = False
    mse_clip: bool = True
    act_order: bool = True
    outlier_fraction: float = 0.0
    rotate: bool | str = "auto"
    quantize_lm_head: bool = True
    calibration_windows: int = 8

    def validate(self) -> None:
        super().validate()
        check_group_size(self.group_size)
        if not 0.0 <= self.outlier_fraction < 0.1:
            raise ConfigError(
                f"outlier_fraction must be in [0, 0.1) (SqueezeLLM keeps about 0.005), got {self.outlier_fraction}"
            )

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        if self.outlier_fraction > 0:
            return "the sparse outliers (outlier_fraction > 0) are not cut into shards; use outlier_fraction=0"
        return super().tensor_parallel_problem(model, tp)

    def quantize_linear(self, linear: nn.Linear, weight: Tensor, hessian: Tensor | None) -> nn.Module:
        weight, outliers = split_outliers(weight, self.outlier_fraction)
        if hessian is not None:
            w = gptq_int4(weight, hessian, self.group_size, self.symmetric, self.damp, act_order=self.act_order,
                          mse_clip=self.mse_clip)
        else:
            w = quantize_int4(weight, self.group_size, self.symmetric, mse_clip=self.mse_clip)
        return W4A8Linear.from_int4(w, linear.bias, dtype=linear.weight.dtype, outliers=outliers)

    def extra_report(self) -> dict[str, Any]:
        return {"scheme": f"int4 weights (group {self.group_size}, {'symmetric' if self.symmetric else 'zero points'})"
                " x int8 per-token activations"}
