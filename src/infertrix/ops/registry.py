"""The list of infertrix ops and the report of which backend runs each.

Each op module declares its op with ``torch.library.custom_op("infertrix::<name>")`` (whose
body is the PyTorch reference, so it runs everywhere), registers a fake implementation for
``torch.compile``/meta tensors, and calls :func:`register_op`. Compiled kernels from
``infertrix._C`` register themselves with the dispatcher for the CPU (and CUDA) key and take
precedence over the reference; :func:`status` asks the dispatcher which one is in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _extension


@dataclass(frozen=True)
class OpInfo:
    name: str  # without the namespace
    reference: Callable  # plain PyTorch implementation, the ground truth for compiled kernels
    doc: str

    @property
    def qualname(self) -> str:
        return f"infertrix::{self.name}"

    def backend(self, device: str) -> str:
        """'c++' / 'cuda' when a compiled kernel is registered for the device, else 'reference'."""
        key = {"cpu": "CPU", "cuda": "CUDA"}[device]
        if torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname, key):
            return "c++" if device == "cpu" else "cuda"
        return "reference"


OPS: dict[str, OpInfo] = {}


def register_op(name: str, reference: Callable) -> OpInfo:
    info = OpInfo(name, reference, (reference.__doc__ or "").strip().split("\n")[0])
    OPS[name] = info
    return info


@dataclass
class OpsStatus:
    extension: str
    cpu_isa: str | None
    ops: dict[str, dict[str, str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"infertrix._C: {self.extension}"]
        if self.cpu_isa:
            lines.append(f"CPU kernels use: {self.cpu_isa}")
        width = max((len(n) for n in self.ops), default=4)
        cpu_w = max((len(b["cpu"]) for b in self.ops.values()), default=3)
        lines.append(f"{'op'.ljust(width)}  {'cpu'.ljust(cpu_w)}  cuda")
        for name, backends in sorted(self.ops.items()):
            lines.append(f"{name.ljust(width)}  {backends['cpu'].ljust(cpu_w)}  {backends['cuda']}")
        return "\n".join(lines)

    def __getitem__(self, name: str) -> dict[str, str]:
        return self.ops[name]


def status() -> OpsStatus:
    """Which backend runs each op on each device, and why the extension is absent if it is."""
    module = _extension.load()
    if module is None:
        ext = _extension.load_error() or "not loaded"
        isa = None
    else:
        ext = f"loaded (built with torch {module.built_with_torch}, cuda={module.with_cuda})"
        isa = module.cpu_isa()
    ops = {}
    for name, info in OPS.items():
        cpu = info.backend("cpu")
        if cpu == "c++" and isa:
            cpu = f"c++/{isa}"
        ops[name] = {"cpu": cpu, "cuda": info.backend("cuda")}
    return OpsStatus(ext, isa, ops)


def set_cpu_isa(name: str) -> str:
    """Request the CPU kernels' instruction set ('auto', 'avx512_vnni', 'avx2', 'scalar').

    Returns the one now in use (never above what the CPU supports). Tests use it to check every
    code path against the reference; users rarely need it.
    """
    module = _extension.load()
    if module is None:
        raise RuntimeError(f"infertrix._C is not available: {_extension.load_error()}")
    return module.set_cpu_isa(name)
