"""``W4A8Linear``: a drop-in ``nn.Linear`` with 4-bit weights and per-token int8 activations.

Storage (plain buffers, so ``state_dict``, safetensors and ``torch.compile`` just work; the kind
``"w4a8"`` of :class:`~.linear_base.QuantizedLinear`, whose ``kernel_buffers()`` gives these):

- ``qweight`` uint8 ``[ceil(N/16), ceil(K/8), 64]``: the 4-bit codes, two per byte, already in the
  order the kernel streams them (``infertrix.ops.w4a8.pack_int4``; one copy of the weights, no
  second "canonical" layout kept beside it);
- ``scale`` float32 ``[N]``: the per-output-channel float scale;
- ``group_scale`` uint8 ``[G, 16 ceil(N/16)]``: the small integer scale of each group;
- ``zero`` uint8 (same shape) when ``symmetric=False``;
- ``bias`` in the original dtype, when the original layer had one;
- ``outlier_rows``, ``outlier_cols`` int64 and ``outlier_values`` float32 ``[nnz]`` with
  ``outliers=nnz`` (SqueezeLLM's sparse side, added after the kernel).

That is 4 bits per weight plus 8 (16 with zero points) bits per group and 32 bits per channel:
4.13 bits per weight at group 128 (4.25 with zero points). The forward pass is one op,
``infertrix::w4a8_linear`` (C++ AVX-512 VNNI / AVX2 / scalar kernel when the extension is built,
else its PyTorch reference): lossy (int4 weights, int8 activations), and a row's output never
depends on the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.transform import ConfigError
from ..ops import w4a8 as w4ops
from .int4 import Int4Weights, check_group_size
from .linear_base import QuantizedLinear, check_linear

_w4a8_linear = torch.ops.infertrix.w4a8_linear.default  # resolved once: forward runs ~200 times a token


class W4A8Linear(QuantizedLinear, kind="w4a8"):
    """4-bit weights (two-level scales), int8 per-token activations, int32 accumulation."""

    kernel = "infertrix::w4a8_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        symmetric: bool = False,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        outliers: int = 0,
    ) -> None:
        check_group_size(group_size)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"W4A8Linear computes in float32, bfloat16 or float16, got {dtype}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        self.symmetric = symmetric
        groups = w4ops.num_groups(in_features, group_size)
        p, s, _ = w4ops.packed_shape(out_features, in_features)
        self.register_buffer("qweight", torch.zeros(p, s, 64, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("group_scale", torch.ones(groups, p * 16, dtype=torch.uint8, device=device))
        self.register_buffer(
            "zero", None if symmetric else torch.full((groups, p * 16), 8, dtype=torch.uint8, device=device)
        )
        # SqueezeLLM's dense-and-sparse option: the largest weights kept in float, as (row, col, value)
        for name, dt in (("outlier_rows", torch.int64), ("outlier_cols", torch.int64), ("outlier_values", torch.float32)):
            self.register_buffer(name, torch.zeros(outliers, dtype=dt, device=device) if outliers else None)
        self.has_outliers = outliers > 0

    @classmethod
    def from_int4(
        cls,
        w: Int4Weights,
        bias: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        outliers: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> W4A8Linear:
        """Build from quantized codes; ``outliers`` = (rows, cols, values) kept in float beside them."""
        n, k = w.q.shape
        nnz = 0 if outliers is None else outliers[0].numel()
        mod = cls(k, n, w.group_size, w.zero is None, bias is not None, dtype=dtype, device=w.q.device, outliers=nnz)
        if nnz:
            mod.outlier_rows.copy_(outliers[0])
            mod.outlier_cols.copy_(outliers[1])
            mod.outlier_values.copy_(outliers[2])
        mod.qweight.copy_(w4ops.pack_int4(w.q))
        mod.scale.copy_(w.scale)
        mod.group_scale.copy_(w4ops.pack_group_params(w.group_scale))
        if w.zero is not None:
            mod.zero.copy_(w4ops.pack_group_params(w.zero))
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> W4A8Linear:
        """Round-to-nearest quantization of an ``nn.Linear`` (no data needed)."""
        from .int4 import quantize_int4

        check_linear(linear)
        w = quantize_int4(linear.weight, group_size, symmetric)
        return cls.from_int4(w, linear.bias, dtype=linear.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _w4a8_linear(
            x, self.qweight, self.scale, self.group_scale, self.zero, self.in_features, self.group_size, self.bias
        )
        if not self.has_outliers:
            return y
        # sparse side: y[:, r] += x[:, c] * v for each kept (r, c, v), in float
        x2 = x.reshape(-1, self.in_features).float()
        y2 = y.reshape(-1, self.out_features).float()
        y2 = y2.index_add(1, self.outlier_rows, x2[:, self.outlier_cols] * self.outlier_values)
        return y2.reshape(y.shape).to(y.dtype)

    def extra_spec(self) -> dict:
        return {"group_size": self.group_size, "symmetric": self.symmetric,
                "outliers": 0 if self.outlier_values is None else self.outlier_values.numel()}

    @classmethod
    def _fused(cls, mods: Sequence[W4A8Linear]) -> W4A8Linear | None:
        """One group size and scheme, no sparse outliers, output sizes in whole 16-row panels."""
        first = mods[0]
        if any(m.has_outliers or m.group_size != first.group_size or m.symmetric != first.symmetric
               or m.out_features % 16 for m in mods):
            return None
        fused = cls(first.in_features, sum(m.out_features for m in mods), first.group_size, first.symmetric,
                    first.bias is not None, dtype=first.dtype)
        fused.group_scale = torch.cat([m.group_scale for m in mods], dim=1)
        if not first.symmetric:
            fused.zero = torch.cat([m.zero for m in mods], dim=1)
        fused._share_rows(mods, "qweight", 16)  # packed in panels of 16 output channels
        fused._share_rows(mods, "scale")
        return fused

    def shard(self, dim: int, start: int, end: int) -> W4A8Linear | None:
        """Output rows anywhere; input columns only from a group boundary (whole groups). Not with
        sparse outliers."""
        g = self.group_size if self.group_size > 0 else 1 << 62  # -1: one group per row, cut anywhere
        if self.has_outliers or (dim == 1 and g < self.in_features
                                 and (start % g or (end % g and end != self.in_features))):
            return None
        w = self.int4_weights()
        if dim == 0:
            rows = slice(start, end)
            part = Int4Weights(w.q[rows], w.scale[rows], w.group_scale[rows],
                               None if w.zero is None else w.zero[rows], w.group_size)
            return W4A8Linear.from_int4(part, None if self.bias is None else self.bias[rows], self.dtype)
        groups = slice(start // g, -(-end // g)) if g < self.in_features else slice(0, 1)
        part = Int4Weights(w.q[:, start:end], w.scale, w.group_scale[:, groups],
                           None if w.zero is None else w.zero[:, groups], w.group_size)
        return W4A8Linear.from_int4(part, None, self.dtype)

    def int8_accumulators(self, x_q: Tensor) -> Tensor:
        return torch.ops.infertrix.w4a8_matmul_int32.default(
            x_q, self.qweight, self.group_scale, self.zero, self.in_features, self.out_features, self.group_size
        )

    def int4_weights(self) -> Int4Weights:
        """The codes and scales in plain [N, K] / [N, G] form."""
        n = self.out_features
        return Int4Weights(
            q=w4ops.unpack_int4(self.qweight, n, self.in_features),
            scale=self.scale,
            group_scale=self.group_scale[:, :n].t().to(torch.int32),
            zero=None if self.zero is None else self.zero[:, :n].t().to(torch.int32),
            group_size=self.group_size,
        )

    def dequantize(self) -> Tensor:
        """The float weight [N, K] these codes (and any sparse outliers) represent."""
        w = self.int4_weights().dequantize()
        if self.outlier_values is not None:
            w = w.index_put((self.outlier_rows, self.outlier_cols), self.outlier_values, accumulate=True)
        return w


def split_outliers(w: Tensor, fraction: float) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """SqueezeLLM's dense-and-sparse split (Kim et al. 2024, https://arxiv.org/abs/2306.07629).

    The largest-magnitude ``fraction`` of the weights leave the dense matrix (set to 0 there, which
    shrinks the quantization ranges) and are kept exactly, in float, as (rows, cols, values).
    """
    nnz = int(round(fraction * w.numel()))
    if nnz == 0:
        return w, None
    flat = w.flatten()
    idx = flat.abs().topk(nnz).indices.sort().values
    rows, cols = idx // w.shape[1], idx % w.shape[1]
    vals = flat[idx].float().clone()
    dense = w.clone()
    dense[rows, cols] = 0
    return dense, (rows, cols, vals)
