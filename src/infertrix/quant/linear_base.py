"""``QuantizedLinear``: the one interface of the quantized linear modules, and their registry.

A quantized module is a subclass that names its *kind*, and defining the class registers it::

    class W4A8Linear(QuantizedLinear, kind="w4a8"):
        kernel = "infertrix::w4a8_linear"

Checkpoint loading (:mod:`.checkpoint`) and the decode engine (which also runs drafts) find every kind through :meth:`QuantizedLinear.kinds` and ask the module what it
can do, so a new kind is its own file with no list to edit (the torchao handler-registry shape,
applied to modules).

The contract, what every kind provides and what readers may rely on:

- ``kind``: a stable name, recorded in checkpoints (never rename one); ``kernel``: the op its
  forward calls, for reports.
- ``in_features``, ``out_features``, ``dtype`` (of the float layer it replaced, and of its
  output), the ``bias`` buffer (None without one).
- All state in buffers, no parameters: ``state_dict`` and safetensors hold it as is;
  :meth:`storage_bytes` counts it.
- :meth:`spec` gives the constructor's keyword arguments (JSON-able) plus ``type`` (the kind);
  :meth:`from_spec` builds an empty module of that shape, which loading then fills. So a kind's
  ``__init__`` takes ``in_features, out_features, bias, dtype`` and its :meth:`extra_spec` keys.
- :meth:`kernel_buffers`: the raw tensors its kernel reads, by buffer name, as stored (no copies):
  packed weight codes, scales, zero points (None when symmetric), the bias, and anything else the
  forward adds (a buffer that is not None is in use). Their layouts are the kind's own, documented
  in its module; the group size and other integers are in :meth:`spec`.
- :meth:`fuse`: one module computing several same-kind modules' outputs concatenated (they share
  an input: q/k/v, gate/up), or None where the kind (or these modules) cannot.
- :meth:`check_loaded`: raise when tensors loaded from a file break an invariant of the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.transform import ConfigError

_KINDS: dict[str, type[QuantizedLinear]] = {}


class QuantizedLinear(nn.Module):
    """Base of the quantized replacements of ``nn.Linear``; see the module docstring for the contract."""

    kind: ClassVar[str]
    kernel: ClassVar[str] = "torch"

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is None:
            raise TypeError(f"{cls.__name__} must name its kind: class {cls.__name__}(QuantizedLinear, kind='...')")
        old = _KINDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"quantized linear kind {kind!r} is already {old.__module__}.{old.__qualname__}")
        cls.kind = kind
        _KINDS[kind] = cls  # a reloaded module replaces its own earlier class

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def _apply(self, fn, recurse: bool = True):
        """``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` move a quantized layer but keep its
        scales in the dtype its kernel reads (float32 scales cast to bfloat16 lost precision and made
        the kernels refuse them); the output dtype and the bias follow the conversion."""
        kept = {n: b for n, b in self._buffers.items() if b is not None and n != "bias" and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    @staticmethod
    def kinds() -> dict[str, type[QuantizedLinear]]:
        """Every registered kind by name (those whose modules are imported: ``infertrix.quant`` imports ours)."""
        return dict(_KINDS)

    @staticmethod
    def lookup(name: str) -> type[QuantizedLinear] | None:
        """The class recorded as ``name`` in a checkpoint: a kind, or the class name that checkpoints
        written before kinds had names recorded (``"W4A8Linear"``)."""
        return _KINDS.get(name) or next((c for c in _KINDS.values() if c.__name__ == name), None)

    # --- the spec: what a checkpoint records to rebuild the empty module
    def spec(self) -> dict[str, Any]:
        """Constructor arguments, recorded in config.json for :func:`infertrix.quant.load_quantized`."""
        return {"type": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": str(self.dtype).removeprefix("torch."), **self.extra_spec()}

    def extra_spec(self) -> dict[str, Any]:
        """The kind's own constructor arguments (group size, scheme)."""
        return {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantizedLinear:
        args = {k: v for k, v in spec.items() if k != "type"}
        return cls(**{**args, "dtype": getattr(torch, args["dtype"])})

    # --- what readers ask
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def kernel_buffers(self) -> dict[str, Tensor | None]:
        """The module's buffers by name, as stored (views of its own tensors, None where unused)."""
        return dict(self._buffers)

    @classmethod
    def fuse(cls, mods: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
        """One module of this kind computing ``cat([m(x) for m in mods], -1)``, whose buffers the given
        modules then view (nothing duplicated), or None: not all of this kind, of one input size, all
        with or all without a bias, or a kind (or settings) that cannot fuse."""
        first = mods[0]
        if any(type(m) is not cls or m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
               for m in mods):
            return None
        fused = cls._fused(mods)
        if fused is not None and first.bias is not None:
            fused.bias = torch.cat([m.bias for m in mods])
        return fused

    @classmethod
    def _fused(cls, mods: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
        """What :meth:`fuse` does once the common checks passed (the bias is done after it); a kind
        that can fuse overrides it."""
        return None

    def _share_rows(self, mods: Sequence[QuantizedLinear], name: str, rows_per_entry: int = 1) -> None:
        """Set buffer ``name`` to the concatenation of ``mods``' (along dim 0, ``rows_per_entry``
        output rows per entry) and make each of them view its own slice of it."""
        setattr(self, name, torch.cat([getattr(m, name) for m in mods]))
        start = 0
        for m in mods:  # row slices of a contiguous tensor: the kernels read them as before
            end = start + m.out_features
            setattr(m, name, getattr(self, name)[start // rows_per_entry : end // rows_per_entry])
            start = end

    # --- tensor parallelism (quant/tensor_parallel.py)
    def shard(self, dim: int, start: int, end: int) -> QuantizedLinear | None:
        """A module of this kind holding only output features (``dim=0``) or input features (``dim=1``)
        ``[start, end)`` of this one, computing what this one computes there, without a bias when
        ``dim=1`` (a row-parallel bias is added once, after the reduction); or None where the kind
        cannot be cut there."""
        return None

    def int8_accumulators(self, x_q: Tensor) -> Tensor | None:
        """For kinds with per-token int8 activations: the int32 products ``[M, out_features]`` of the
        int8 codes ``x_q`` ``[M, in_features]`` with the weight codes, such that the forward is
        ``acc * x_scale * self.scale (+ bias)``; None for other kinds (a row-parallel shard needs it)."""
        return None

    def check_loaded(self, name: str) -> None:
        """Raise when tensors loaded into this module (as ``name``) break an invariant of its kernel."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")


def check_linear(linear: nn.Module) -> None:
    """Raise a clear error for layers no quantized kind can take."""
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"expected an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    if w.device.type == "meta":
        raise ConfigError(
            "the layer's weights are on the meta device (not loaded, or offloaded by accelerate's device_map "
            "to cpu/disk); load the model's weights before quantizing: load it on one device, optimize it, then "
            "accelerate.dispatch_model(model, device_map)"
        )
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"cannot quantize a {w.dtype} linear layer; it must be float32, bfloat16 or float16")
