"""Low-bit experts: each expert stored, moved and computed in int8 or int4 (EdgeMoE).

EdgeMoE (Yi et al. 2023, https://arxiv.org/abs/2308.14352) keeps experts on storage in low bit
widths so a cache miss moves fewer bytes and the same fast memory holds more experts. Here one
expert is one byte blob holding gate_up's and down's quantized tensors in exactly the buffers of
our quantized linears, so a resident expert runs on the existing kernel with no dequantization:

- ``bits=8``: W8A8 (:class:`~infertrix.quant.w8a8.W8A8Linear`): int8 codes per output channel
  ``qweight [N, K]`` + float32 ``scale [N]``; ``infertrix::w8a8_linear``. 8.0 bits per weight
  plus 32 per channel: a float32 expert's bytes / 4.
- ``bits=4``: W4A8 (:class:`~infertrix.quant.w4a8_linear.W4A8Linear`): packed codes
  ``[ceil(N/16), ceil(K/8), 64]``, ``scale [N]``, integer ``group_scale`` and ``zero`` per group
  of ``group_size`` input channels (round to nearest, zero points, MSE clipping search: the
  ``w4a8`` recipe's data-free default; or GPTQ from each expert's own routed tokens,
  ``moe.calibrate``); ``infertrix::w4a8_linear``. 4.5 bits per weight at group 32: about a
  float32 expert's bytes / 7.

Lossy, with the numerics of ``quant.W8A8``/``quant.W4A8`` on an ``nn.Linear`` (int8 per-token
activations too). Each tensor starts on a 64-byte boundary and the blob is padded to ``ALIGN``
bytes, so cache slots of consecutive experts stay page aligned for ``O_DIRECT`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops import engine as _engine_ops  # noqa: F401 - declares infertrix::silu_mul
from ..ops import w4a8 as w4ops
from ..quant.gptq import gptq_int4
from ..quant.int4 import Int4Weights, check_group_size, quantize_int4
from ..quant.w8a8 import quantize_int8_per_channel
from .expert_files import ALIGN, dtype_name, dtype_size

BITS = (4, 8)
_w4a8 = torch.ops.infertrix.w4a8_linear.default
_w8a8 = torch.ops.infertrix.w8a8_linear.default
_silu_mul = torch.ops.infertrix.silu_mul.default
_SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' SiLU modules


def is_silu(act_fn: object) -> bool:
    """Whether an experts module's activation is SiLU (its gated product is one ``infertrix::silu_mul``)."""
    return type(act_fn).__name__ in _SILU


@dataclass(frozen=True)
class _Part:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


class LowBitFormat:
    """Layout and arithmetic of one int8/int4 expert of shapes ``gate_up [2I, H]``, ``down [H, I]``."""

    def __init__(self, bits: int, group_size: int, gate_up_shape: tuple[int, int], down_shape: tuple[int, int]):
        if bits not in BITS:
            raise ValueError(f"low-bit experts have 4 or 8 bits, got {bits}")
        check_group_size(group_size)
        self.bits, self.group_size = bits, group_size
        self.gate_up_shape, self.down_shape = tuple(gate_up_shape), tuple(down_shape)
        self.parts: list[_Part] = []
        off = 0
        for mat, (n, k) in (("gate_up", self.gate_up_shape), ("down", self.down_shape)):
            if bits == 8:
                specs = [("qweight", torch.int8, (n, k)), ("scale", torch.float32, (n,))]
            else:
                p, s, _ = w4ops.packed_shape(n, k)
                g = w4ops.num_groups(k, group_size)
                specs = [("qweight", torch.uint8, (p, s, 64)), ("scale", torch.float32, (n,)),
                         ("group_scale", torch.uint8, (g, 16 * p)), ("zero", torch.uint8, (g, 16 * p))]
            for name, dtype, shape in specs:
                part = _Part(f"{mat}.{name}", dtype, shape, off)
                self.parts.append(part)
                off = -(-(off + part.nbytes) // 64) * 64
        self.nbytes = -(-off // ALIGN) * ALIGN
        self._names = {mat: [p.name for p in self.parts if p.name.startswith(f"{mat}.")] for mat in ("gate_up", "down")}
        self._in_features = {"gate_up": self.gate_up_shape[1], "down": self.down_shape[1]}

    # -- manifest ---------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size,
                "gate_up_shape": list(self.gate_up_shape), "down_shape": list(self.down_shape)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowBitFormat:
        return cls(spec["bits"], spec["group_size"], spec["gate_up_shape"], spec["down_shape"])

    # -- bytes <-> tensors ------------------------------------------------------------------
    def views(self, blob: Tensor) -> dict[str, Tensor]:
        """Typed zero-copy views of one expert's blob (uint8 ``[nbytes]``, any device)."""
        return {p.name: blob[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in self.parts}

    def encode(self, gate_up: Tensor, down: Tensor, hessians: tuple[Tensor, Tensor] | None = None,
               damp: float = 0.01) -> Tensor:
        """Quantize one float expert into a new blob (uint8 ``[nbytes]``, on the CPU): codes rounded
        to nearest, or, given its input Hessians ``(H_gate_up, H_down)`` (``moe.calibrate``), GPTQ
        (int4: ``act_order`` with static groups and the MSE clipping search, as ``w4a8(gptq=true)``)."""
        blob = torch.zeros(self.nbytes, dtype=torch.uint8)
        v = self.views(blob)
        for i, (mat, w) in enumerate((("gate_up", gate_up), ("down", down))):
            w = w.detach().to("cpu", torch.float32)
            h = None if hessians is None else hessians[i]
            if self.bits == 8:
                q, scale = quantize_int8_per_channel(w, h, damp)
                v[f"{mat}.qweight"].copy_(q)
                v[f"{mat}.scale"].copy_(scale)
            else:
                if h is None:
                    w4 = quantize_int4(w, self.group_size, symmetric=False, mse_clip=True)
                else:
                    w4 = gptq_int4(w, h, self.group_size, symmetric=False, damp=damp, act_order=True, mse_clip=True)
                v[f"{mat}.qweight"].copy_(w4ops.pack_int4(w4.q))
                v[f"{mat}.scale"].copy_(w4.scale)
                v[f"{mat}.group_scale"].copy_(w4ops.pack_group_params(w4.group_scale))
                v[f"{mat}.zero"].copy_(w4ops.pack_group_params(w4.zero))
        return blob

    def decode(self, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The float32 weights the codes represent (for ``restore``; lossy against the original)."""
        out = []
        for mat, (n, k) in (("gate_up", self.gate_up_shape), ("down", self.down_shape)):
            q, scale = parts[f"{mat}.qweight"], parts[f"{mat}.scale"]
            if self.bits == 8:
                out.append(q.float() * scale[:, None])
            else:
                gs, z = parts[f"{mat}.group_scale"], parts[f"{mat}.zero"]
                out.append(Int4Weights(w4ops.unpack_int4(q, n, k), scale, gs[:, :n].t().to(torch.int32),
                                       z[:, :n].t().to(torch.int32), self.group_size).dequantize())
        return out[0], out[1]

    # -- compute ----------------------------------------------------------------------------
    def linear(self, parts: dict[str, Tensor], mat: str, x: Tensor) -> Tensor:
        names = self._names[mat]
        if self.bits == 8:
            return _w8a8(x, parts[names[0]], parts[names[1]], None)
        return _w4a8(x, parts[names[0]], parts[names[1]], parts[names[2]], parts[names[3]], self._in_features[mat],
                     self.group_size, None)

    def forward(self, parts: dict[str, Tensor], x: Tensor, act_fn) -> Tensor:
        """The expert on rows ``x``: ``down(act(gate(x)) * up(x))``, as the model's experts do (SiLU
        experts: the gated product in one ``infertrix::silu_mul`` call, equal to float32 rounding)."""
        gate_up = self.linear(parts, "gate_up", x)
        if is_silu(act_fn):
            return self.linear(parts, "down", _silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.linear(parts, "down", act_fn(gate) * up)

    def __repr__(self) -> str:
        extra = "" if self.bits == 8 else f", group {self.group_size}"
        return f"int{self.bits} experts ({self.nbytes} bytes each{extra})"


class PartsWriter:
    """Turns float experts ``(gate_up, down)`` into the parts a layer file holds: as they are, or
    quantized into one low-bit blob (``layer_bits``: other widths for some layers); remembers what
    the manifest must say."""

    def __init__(self, bits: int | None, group_size: int, damp: float | None = None,
                 layer_bits: dict[int, int] | None = None):
        self.bits, self.group_size, self.damp = bits, group_size, damp
        self.layer_bits = {i: b for i, b in (layer_bits or {}).items() if b != bits}
        self.formats: dict[int, LowBitFormat] = {}  # by bit width
        self.dtype: torch.dtype | None = None

    def format(self, bits: int, gu: torch.Tensor, dn: torch.Tensor) -> LowBitFormat:
        if bits not in self.formats:
            self.formats[bits] = LowBitFormat(bits, self.group_size, tuple(gu.shape), tuple(dn.shape))
            self.dtype = gu.dtype
        return self.formats[bits]

    def parts(self, experts: Any, hessians: Any = None, layer: int | None = None, encoded: Any = None) -> Any:
        """``one(j)``, the parts of expert ``j``; ``encoded(j)``: its blob if already quantized at
        this layer's width (else None)."""
        bits = self.layer_bits.get(layer, self.bits)

        def one(j: int) -> dict[str, torch.Tensor]:
            gu, dn = experts(j)
            if bits is None:
                return {"gate_up": gu, "down": dn}
            fmt = self.format(bits, gu, dn)
            blob = None if encoded is None else encoded(j)
            if blob is None:
                blob = fmt.encode(gu, dn, None if hessians is None else hessians(j), self.damp or 0.01)
            return {"lowbit": blob}

        return one

    def manifest(self, uncalibrated: int = 0) -> dict[str, Any]:
        """What the manifest says of the parts written; ``uncalibrated``: experts GPTQ found no
        tokens for (rounded to nearest instead)."""
        if not self.formats:
            return {}
        rounding = {"rounding": "nearest"} if self.damp is None else {
            "rounding": "gptq", "damp": self.damp, "uncalibrated_experts": uncalibrated}
        fmt = self.formats.get(self.bits) or next(iter(self.formats.values()))
        extra = {"lowbit_layers": {str(i): self.formats[b].spec() for i, b in sorted(self.layer_bits.items())}}
        return {"lowbit": fmt.spec(), "dtype": dtype_name(self.dtype), **rounding,
                **(extra if self.layer_bits else {})}
