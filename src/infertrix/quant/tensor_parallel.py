"""Quantized layers on transformers' tensor-parallel shards (``from_pretrained(..., tp_plan="auto")``).

Each rank holds a slice of every linear layer the TP plan names (:mod:`infertrix.core.parallel`).
Quantizing a slice on its own would give another model than one process gives (W8A8's channel
scale and W4A8's two-level scale read the whole row), so every rank quantizes the whole layer,
gathered from the shards, as one process would, and keeps its part through
:meth:`~.linear_base.QuantizedLinear.shard`: output features for ``colwise`` layers (the head's
``colwise_gather_output`` then gathers the vocabulary), whole groups of input features for
``rowwise`` ones. A row-parallel layer quantizes its slice of the activations with the per-token
scale of the whole row (an all-reduce of one max per token), multiplies in int32 and all-reduces
the int32 accumulators, which add up exactly in any order; the float scaling and the bias then run
once. So the sharded model computes the single-process quantized model's products, up to the float
rounding of the final scaling (compiled kernels may order it differently).

Costs: each rank holds one whole float layer at a time while quantizing; a row-parallel forward
adds one all-reduce of a float per token to the all-reduce transformers already does (of int32
accumulators instead of float outputs). What each rank stores is its shards only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.parallel import TensorParallel
from ..core.transform import UnsupportedModelError
from ..ops.quantize import MIN_AMAX
from .linear_base import QuantizedLinear

# transformers' styles (transformers/distributed/tensor_parallel.py) -> (sharded dim, input or output whole)
_STYLES = {
    "colwise": (0, False),
    "colwise_gather_output": (0, True),  # the output gathered on every rank
    "colwise_rep": (0, True),
    "rowwise": (1, False),  # the input arrives as this rank's slice
    "rowwise_split_input": (1, True),  # the input arrives whole; this rank takes its slice
    "rowwise_rep": (1, True),
}


def chunk(size: int, tp: TensorParallel, rank: int | None = None) -> tuple[int, int]:
    """Rank ``rank``'s (default: this one's) ``[start, end)`` of ``size`` features, as DTensor's
    ``Shard`` splits them (torch.chunk)."""
    step = -(-size // tp.world)
    start = min((tp.rank if rank is None else rank) * step, size)
    return start, min(start + step, size)


def full_tensor(t: Tensor | None) -> Tensor | None:
    """The whole tensor behind a (possibly sharded) DTensor parameter; a collective on DTensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_linear(linear: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding the whole weight and bias of a sharded one (every rank must call it)."""
    w, b = full_tensor(linear.weight.detach()), full_tensor(None if linear.bias is None else linear.bias.detach())
    full = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    full.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        full.bias = nn.Parameter(b, requires_grad=False)
    return full


def shard_problem(name: str, style: str | None, in_features: int, group_size: int, tp: TensorParallel) -> str | None:
    """Why a layer of this style cannot be cut into whole groups of ``group_size`` (-1: one per row)."""
    if style is None:
        return None
    if style not in _STYLES:
        return f"{name} is sharded as {style!r}, which infertrix's quantized layers do not implement"
    if _STYLES[style][0] != 1 or not 0 < group_size < in_features:
        return None
    for rank in range(tp.world):  # every rank's cut: all ranks refuse together
        start, end = chunk(in_features, tp, rank)
        if start % group_size or (end % group_size and end != in_features):
            return (f"{name}'s {in_features} input features split at {start}:{end} on rank {rank}, not on a "
                    f"boundary of group_size={group_size}; choose a group size dividing {end - start} (or -1)")
    return None


def shard_quantized(full: QuantizedLinear, name: str, tp: TensorParallel) -> QuantizedLinear:
    """This rank's part of the quantized whole layer ``full``, with the collective of its TP style."""
    style = tp.style(name)
    if style is None:
        return full
    problem = shard_problem(name, style, full.in_features, getattr(full, "group_size", -1), tp)
    if problem:
        raise UnsupportedModelError(problem)
    dim, whole = _STYLES[style]
    start, end = chunk(full.out_features if dim == 0 else full.in_features, tp)
    part = full.shard(dim, start, end)
    if part is None or (dim == 1 and type(part).int8_accumulators is QuantizedLinear.int8_accumulators):
        raise UnsupportedModelError(f"{name}: a {full.kind} layer cannot be cut as {style!r}")
    if dim == 0 and whole:
        part.forward = _GatherOutput(part, tp, full.out_features)
    elif dim == 1:
        part.forward = _RowParallel(part, tp, full.bias, (start, end) if whole else None)
    return part


class _GatherOutput:
    """A column-parallel forward whose outputs every rank then holds whole (the head's logits)."""

    def __init__(self, module: QuantizedLinear, tp: TensorParallel, out_features: int) -> None:
        self.module, self.tp, self.out_features = module, tp, out_features

    def __call__(self, x: Tensor) -> Tensor:
        y = type(self.module).forward(self.module, x)
        step = -(-self.out_features // self.tp.world)  # all_gather wants equal sizes: pad the last rank's
        y = nn.functional.pad(y, (0, step - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.tp.world)]
        dist.all_gather(parts, y, group=self.tp.group)
        return torch.cat(parts, -1)[..., : self.out_features]


class _RowParallel:
    """A row-parallel forward: int8 activations on the whole row's per-token scale, int32 all-reduce."""

    def __init__(self, module: QuantizedLinear, tp: TensorParallel, bias: Tensor | None,
                 cut: tuple[int, int] | None) -> None:
        self.module, self.tp, self.bias, self.cut = module, tp, bias, cut

    def __call__(self, x: Tensor) -> Tensor:
        if self.cut is not None:
            x = x[..., self.cut[0] : self.cut[1]]
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1]).float()
        amax = xf.abs().amax(-1, keepdim=True) if xf.shape[-1] else xf.new_zeros(xf.shape[0], 1)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.tp.group)
        amax = amax.clamp_min(MIN_AMAX)
        # the same rounding as infertrix::quantize_per_token_int8 (an exactly rounded division)
        x_q = torch.round(xf * (torch.full_like(amax, 127.0) / amax)).clamp_(-127, 127).to(torch.int8)
        acc = self.module.int8_accumulators(x_q)
        dist.all_reduce(acc, group=self.tp.group)
        y = (acc.to(torch.float32) * (amax / 127.0)) * self.module.scale
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*lead, -1).to(x.dtype)
