"""How the engine calls each linear kind: the one place that reads quantized modules' buffers.

Every call here is row-invariant (a row's output depends only on that row): float32 layers run
``infertrix::skinny_linear`` in chunks of at most ``skinny_linear.MAX_ROWS`` rows (above that the
op would hand over to torch's GEMM, whose blocking depends on the batch); W4A8 and W8A8 layers
quantize each token on its own and accumulate in exact int32; FlattenQuant layers quantize with
one static scale and accumulate in exact int32; W4A16 layers run torch's CPU int4
kernel (``aten._weight_int4pack_mm_for_cpu``, bfloat16 activations), which computes each row on
its own (checked bit for bit against 1-row calls for 1..1100 rows at 1 and 2 threads, and tested
in ``tests/engine``). ``fuse`` joins same-kind quantized projections (q/k/v, gate/up) into one call
through the kind's own ``QuantizedLinear.fuse``; the original modules then view the fused
buffers, so no weight is stored twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ops.engine import LINEAR_KINDS, SLOT_TENSORS, w4a16
from ..ops.skinny_linear import MAX_ROWS

_skinny = torch.ops.infertrix.skinny_linear.default
_w4a8 = torch.ops.infertrix.w4a8_linear.default
_w4a8_argmax = torch.ops.infertrix.w4a8_linear_argmax.default
_w8a8 = torch.ops.infertrix.w8a8_linear.default
_w8a8_flat = torch.ops.infertrix.w8a8_flat_linear.default

Linear = Callable[[Tensor], Tensor]  # x [M, K] -> [M, N]


def kind(module: nn.Module) -> str | None:
    """'fp32', 'w4a8', 'w8a8', 'w4a16' or 'w8a8_flat' for a linear the engine can run, else None."""
    from ..quant.flattenquant import FlattenLinear
    from ..quant.w4a8_linear import W4A8Linear
    from ..quant.w4a16 import COMPUTE_DTYPE, W4A16Linear
    from ..quant.w8a8 import W8A8Linear

    if type(module) is W4A8Linear:
        return None if module.has_outliers or module.scale.dtype != torch.float32 else "w4a8"
    if type(module) is W8A8Linear:
        return "w8a8"
    if type(module) is FlattenLinear:
        return "w8a8_flat"
    if type(module) is W4A16Linear:
        ok = module.dtype == torch.float32 and module.scales_and_zeros.dtype == COMPUTE_DTYPE
        return "w4a16" if ok else None
    if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32 and not module._forward_hooks:
        return "fp32"
    return None


def why_not(module: nn.Module, name: str) -> str | None:
    """None when the engine can run ``module``, else the reason."""
    if kind(module) is not None:
        return None
    if isinstance(module, nn.Linear):
        return f"{name} is a {module.weight.dtype} nn.Linear (the engine runs float32)"
    return (f"{name} is a {type(module).__name__} (the engine runs float32 nn.Linear, W4A8Linear, W8A8Linear, "
            "float32 W4A16Linear, FlattenLinear)")


def linear(module: nn.Module) -> Linear:
    """The engine's call for one linear module."""
    k = kind(module)
    m = module
    if k == "w4a8":
        return lambda x: _w4a8(x, m.qweight, m.scale, m.group_scale, m.zero, m.in_features, m.group_size, m.bias)
    if k == "w8a8":
        return lambda x: _w8a8(x, m.qweight, m.scale, m.bias)
    if k == "w4a16":
        return lambda x: w4a16(x, m.qweight, m.scales_and_zeros, m.group_size, m.bias)
    if k == "w8a8_flat":
        return lambda x: _w8a8_flat(*m.kernel_args(x))
    return fp32_rows(module.weight, module.bias)


def fp32_rows(w: Tensor, b: Tensor | None = None) -> Linear:
    """``x @ w.T (+ b)`` for float32 ``w`` [N, K], row-invariant: ``infertrix::skinny_linear`` in
    chunks of at most ``MAX_ROWS`` rows."""

    def fp32(x: Tensor) -> Tensor:
        if x.shape[0] <= MAX_ROWS:
            return _skinny(x, w, b)
        return torch.cat([_skinny(x[i : i + MAX_ROWS], w, b) for i in range(0, x.shape[0], MAX_ROWS)])

    return fp32


def argmax(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """Greedy decoding's head: each row's argmax of ``linear(module)``'s output (int64 [M], the same
    token bit for bit, first index on ties). W4A8 computes it inside the kernel without writing
    the [M, vocab] logits; the other kinds take the argmax of their logits."""
    m = module
    if kind(module) == "w4a8":
        return lambda x: _w4a8_argmax(x, m.qweight, m.scale, m.group_scale, m.zero, m.in_features, m.group_size,
                                      m.bias)
    call = linear(module)
    return lambda x: call(x).argmax(-1)


def slot(module: nn.Module) -> tuple[list[int], list[Tensor | None]]:
    """``module`` in ``infertrix::engine_layer``'s packed layout: (kind, in_features, group_size)
    and its ``SLOT_TENSORS`` tensors (see ``ops/engine.py``)."""
    k = kind(module)
    m = module
    if k == "w4a8":
        ints, t = [LINEAR_KINDS[k], m.in_features, m.group_size], [m.qweight, m.scale, m.group_scale, m.zero, m.bias]
    elif k == "w8a8":
        ints, t = [LINEAR_KINDS[k], m.in_features, 0], [m.qweight, m.scale, None, None, m.bias]
    elif k == "w4a16":
        ints, t = [LINEAR_KINDS[k], m.in_features, m.group_size], [m.qweight, m.scales_and_zeros, None, None, m.bias]
    elif k == "w8a8_flat":
        ints, t = [LINEAR_KINDS[k], m.in_features, 0], [m.qweight, m.scales, None, None, m.bias]
    else:
        ints, t = [LINEAR_KINDS["fp32"], m.in_features, 0], [m.weight.detach(), None, None, None,
                                                             None if m.bias is None else m.bias.detach()]
    return ints, t + [None] * (SLOT_TENSORS - len(t))


def fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)`` for same-kind quantized modules (the
    outputs are per channel, so each equals its own module's bit for bit); None when they differ
    or are float32 (fusing those would copy the weights)."""
    kinds = {kind(m) for m in mods}
    if len(kinds) != 1 or kinds == {"fp32"} or None in kinds:
        return None
    return type(mods[0]).fuse(mods)
