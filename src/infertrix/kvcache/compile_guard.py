"""``torch.compile`` and KV-cache policies: a compiled ``forward`` runs eagerly while it gets a PolicyCache.

What a :class:`~infertrix.kvcache.PolicyCache` does inside a forward cannot be traced by dynamo
without graph breaks: eviction keeps a data-dependent number of tokens per layer (``Tensor.item``),
and its layers append in place into buffers whose reuse is decided by comparing data pointers. Each
graph break inside the model makes dynamo compile the nested forwards one by one, and transformers
decorates them all with one wrapper function, so a few steps hit ``recompile_limit`` and print a
wall of warnings before falling back to eager anyway.

So the policy opts out cleanly instead: a forward pre-hook on the top model switches
``torch.compiler.set_stance("force_eager")`` on for any forward that receives a PolicyCache (a hook
registered with ``always_call`` switches it back, even when the forward raises) and warns once, in one
line, when the model's forward was compiled. The tokens are those of the uncompiled model. The stance
is process-wide while such a forward runs: other threads' compiled functions run eagerly meanwhile.
A model compiled as a whole (``torch.compile(model)``) and called directly with a PolicyCache is
traced, hooks included, and is not covered; its ``generate`` is the uncompiled model's and is.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..core.generation import cache_argument
from .cache import EvictingCache


def _compiled(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    forwards = (model.forward, getattr(inner, "forward", None))
    return any(getattr(f, "_torchdynamo_orig_callable", None) is not None for f in forwards)


class EagerWhileCompressing:
    """The pair of top-model hooks described in the module docstring (one per model)."""

    def __init__(self) -> None:
        self.stances: list[Any] = []  # entered set_stance contexts, innermost last
        self.warned = False

    def install(self, model: nn.Module) -> list:
        return [
            model.register_forward_pre_hook(self.enter, with_kwargs=True),
            model.register_forward_hook(self.exit, always_call=True),
        ]

    def enter(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if torch.compiler.is_compiling() or not isinstance(cache_argument(kwargs), EvictingCache):
            return
        if not self.warned and _compiled(model):
            self.warned = True
            warnings.warn(
                "infertrix: a KV-cache policy's PolicyCache evicts with data-dependent shapes that "
                "torch.compile cannot trace, so the compiled forward runs eagerly while it is given one",
                stacklevel=2,
            )
        stance = torch.compiler.set_stance("force_eager")
        stance.__enter__()
        self.stances.append(stance)

    def exit(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self.stances and not torch.compiler.is_compiling():
            self.stances.pop().__exit__(None, None, None)
