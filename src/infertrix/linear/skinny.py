"""``SkinnyLinear``: float32 linear layers that read their weights once for a few rows.

Decoding multiplies a few rows (a token per sequence, or a verification window of draft tokens)
by every weight matrix, so its time is one read of the weights per step, whatever the number of
rows, as long as the kernel reads each weight once. torch's CPU GEMM does not at 2 to 8 rows, and
its one-row path reads the weights slower than the machine's copy bandwidth (SmolLM2's 49152x576
``lm_head``: 7.4 ms with ``F.linear``, 3.4 ms here, 1 thread). ``infertrix::skinny_linear`` (see
``infertrix.ops.skinny_linear``) is that kernel; this module swap puts it under the float linear
layers that remain after any quantization, sharing their weight tensors (no copy, no extra
memory). Results equal ``F.linear`` to float32 rounding (another summation order), so greedy
outputs can differ from the unoptimized model's only where two tokens' logits tie to within
rounding. Rows beyond 32 (prefill) and non-float32 inputs run ``F.linear`` itself.

It lives in ``infertrix.linear``, not in the quant family, because it changes no number format:
the same float weights run on another kernel (stage ``kernels``, after quantization). It was
``infertrix.quant.Skinny`` before; that name stays as an alias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.transform import Applied, Stage, Transform, UnsupportedModelError
from ..ops import skinny_linear as _declared  # noqa: F401 - declares the op (and loads its kernel) first
from .swap import FilterFn, ModuleSwapper, select_linears

_skinny_linear = torch.ops.infertrix.skinny_linear.default  # resolved once: forward runs ~200 times a token


class SkinnyLinear(nn.Linear):
    """An ``nn.Linear`` (same weight and bias tensors as the layer it replaces) whose forward is
    ``infertrix::skinny_linear``; still an ``nn.Linear``, so quantization can replace it later."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # no fresh weight: share the original's
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return _skinny_linear(x, self.weight, self.bias)


@register_transform("skinny_linear", "skinny")
@dataclass
class Skinny(Transform):
    """Swap the float32 ``nn.Linear`` layers (decoder layers and ``lm_head``) for
    :class:`SkinnyLinear`. Lossless up to float32 rounding; no extra memory; faster decoding (and
    much cheaper speculative verification) on CPUs. Composes with everything: layers another
    transform quantized are no longer ``nn.Linear`` and stay as they are.

    Fields:
      filter_fn: ``filter_fn(module, qualified_name) -> bool`` picks the layers (default: all).
      include_lm_head: also the output projection (on SmolLM2 a fifth of the weights read per token).
    """
    use_when = "the float model must stay exact: faster float32 kernels for small batches, same weights, same results"

    stage: ClassVar[Stage] = Stage.KERNELS
    conflict_group: ClassVar[str | None] = "float kernels"

    filter_fn: FilterFn | None = field(default=None, repr=False)
    include_lm_head: bool = True

    def check_model(self, model: nn.Module) -> None:
        try:
            chosen = select_linears(model, self.filter_fn, self.include_lm_head)
        except UnsupportedModelError as exc:  # no decoder layers, or no nn.Linear left in them
            raise UnsupportedModelError(f"skinny_linear: {exc}") from None
        if self._layers(model):
            return
        plain = [m for m in chosen.values() if type(m) is nn.Linear]
        if not plain:
            raise UnsupportedModelError(
                "skinny_linear: every chosen linear layer is already replaced (quantized, or a SkinnyLinear); "
                "drop skinny_linear or restore(model) first"
            )
        dtypes = sorted({str(m.weight.dtype).removeprefix("torch.") for m in plain})
        raise UnsupportedModelError(
            f"skinny_linear runs float32 weights only, and this model's linear layers are {', '.join(dtypes)}; "
            "load the model in float32 (dtype=torch.float32) or drop skinny_linear"
        )

    def _layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        chosen = select_linears(model, self.filter_fn, self.include_lm_head)
        return {n: m for n, m in chosen.items() if type(m) is nn.Linear and m.weight.dtype == torch.float32}

    def apply(self, model: nn.Module) -> Applied:
        swapper = ModuleSwapper(model)
        layers = self._layers(model)
        for name, lin in layers.items():
            swapper.swap(name, SkinnyLinear(lin))
        return Applied(
            self,
            undo=swapper.undo,
            held=swapper.held,  # the original layers share their tensors: nothing extra in practice
            report=lambda: {"kernel": "infertrix::skinny_linear", "layers": len(layers)},
        )
