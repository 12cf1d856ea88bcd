"""Choosing a model's linear layers and swapping them, reversibly: shared by every module swap
(the quant family's quantized layers, :mod:`~infertrix.linear.skinny`'s float kernels).

Which layers: every ``nn.Linear`` inside the decoder layers, filtered by ``filter_fn(module, name)``
(torchao's convention); the output projection (``lm_head``) only when asked, since on SmolLM2 it is
TIED to the token embedding: quantizing it puts a separate quantized copy in ``lm_head`` and leaves
the embedding's float weight untouched, so the embedding keeps working.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch import Tensor, nn

from ..core.model import decoder_layers
from ..core.transform import UnsupportedModelError

FilterFn = Callable[[nn.Module, str], bool]


def output_projection_name(model: nn.Module) -> str | None:
    """Qualified name of the model's output projection (``lm_head``), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name
    return None


def select_linears(
    model: nn.Module, filter_fn: FilterFn | None, include_lm_head: bool
) -> dict[str, nn.Linear]:
    """Qualified name -> ``nn.Linear`` of the layers to quantize, in model order."""
    layers = decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    head = output_projection_name(model)
    chosen: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):  # SkinnyLinear too: it is an nn.Linear
            continue
        is_head = name == head
        if not is_head and id(mod) not in in_layers:
            continue
        if is_head and not include_lm_head:
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        chosen[name] = mod
    if not chosen:
        raise UnsupportedModelError(
            f"no nn.Linear layers to quantize in {type(model).__name__} (already quantized, or filter_fn "
            "rejected every layer); check filter_fn or restore(model) first"
        )
    return chosen


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace ``model.<name>`` by ``new``; return the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class ModuleSwapper:
    """Swaps modules and remembers the originals (and any parameter it changed) for ``undo``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals: dict[str, nn.Module] = {}
        self.saved_params: list[tuple[nn.Parameter, object]] = []
        self.saved_attrs: list[tuple[object, str, object]] = []

    def swap(self, name: str, new: nn.Module) -> None:
        old = set_submodule(self.model, name, new)
        self.originals.setdefault(name, old)

    def save_param(self, param: nn.Parameter) -> None:
        """Keep a copy of ``param``'s data before an in-place change (smoothing folds into norms)."""
        self.saved_params.append((param, param.detach().clone()))

    def save_attr(self, obj: object, name: str) -> None:
        """Remember ``obj.<name>`` before it is changed (rotation unties the config's embeddings)."""
        self.saved_attrs.append((obj, name, getattr(obj, name)))

    def held(self) -> list[Tensor]:
        """The tensors kept for ``undo`` (the original layers' and the saved copies), for describe."""
        kept = [t for m in self.originals.values() for t in itertools.chain(m.parameters(), m.buffers())]
        return kept + [data for _, data in self.saved_params]

    def undo(self) -> None:
        for name, old in reversed(list(self.originals.items())):
            set_submodule(self.model, name, old)
        for param, data in reversed(self.saved_params):
            param.data.copy_(data)
        for obj, name, value in reversed(self.saved_attrs):
            setattr(obj, name, value)
        self.forget()

    def forget(self) -> None:
        """Drop what ``undo`` would restore (frees the original layers; undo then does nothing)."""
        self.originals.clear()
        self.saved_params.clear()
        self.saved_attrs.clear()
