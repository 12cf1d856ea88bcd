"""The one seam through which transforms change ``model.generate``: an instance-level wrapper.

Cache policies (give ``generate`` a fresh policy cache when the caller passes none) and decoding
transforms (pass a ``custom_generate`` callable, transformers 5's supported seam) register a hook
here. The wrapper is set on the model instance only, never on its class, so other models in the
process are untouched; removing the last hook removes the wrapper.

A hook is ``hook(model, args, kwargs) -> (args, kwargs)``; hooks run in ascending ``order``
(use the transform's stage).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .state import GENERATE_ATTR, state

GenerateHook = Callable[[nn.Module, tuple, dict[str, Any]], tuple[tuple, dict[str, Any]]]

# transformers >= 5.24 passes the cache as ``cache`` (``past_key_values`` is its deprecated alias)
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The cache in a forward's or ``generate``'s keyword arguments, under either name (or None)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(out: Any) -> Any:
    """The cache a forward returned, under this transformers version's name for it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_argument_name(model: nn.Module) -> str:
    """The keyword this transformers version's ``forward`` takes the cache as."""
    return (
        "cache"
        if "cache" in inspect.signature(type(model).forward).parameters
        else "past_key_values"
    )


def add_generate_hook(model: nn.Module, hook: GenerateHook, order: int = 0) -> Callable[[], None]:
    """Register ``hook`` on ``model.generate``; returns a function that removes it."""
    st = state(model, create=True)
    entry = (order, hook)
    st.generate_hooks.append(entry)
    st.generate_hooks.sort(key=lambda e: e[0])
    if GENERATE_ATTR not in model.__dict__:
        unbound = type(model).generate

        @functools.wraps(unbound)
        def generate(*args: Any, **kwargs: Any):
            for _, h in list(st.generate_hooks):
                args, kwargs = h(model, args, kwargs)
            return unbound(model, *args, **kwargs)

        model.__dict__[GENERATE_ATTR] = generate

    def remove() -> None:
        if entry in st.generate_hooks:
            st.generate_hooks.remove(entry)
        if not st.generate_hooks:
            model.__dict__.pop(GENERATE_ATTR, None)

    return remove


def left_padding_start(mask: Tensor, length: int) -> Tensor | None:
    """Row b's first valid slot when ``mask`` [B, length] is zeros then ones in every row, else None."""
    if mask.dim() != 2 or mask.shape[1] != length:
        return None
    m = mask.to(torch.long)
    start = m.argmax(1)
    if not bool((m.sum(1) == length - start).all()):
        return None
    return start


def tree_mask_layout(mask: Tensor, index: int, t: int) -> tuple[Tensor, Tensor | None] | None:
    """Read a 4-D attention mask ``[B, 1, t, index + t]`` (bool: True = seen; float: 0 = seen) as
    (each row's first valid cache slot [B], the token tree over the t new slots as each slot's
    parent slot [B, t], -1: none), or None when it is not that: every query of a row must see
    the same left-padded cache slots, and among the new slots its ancestors-or-self in a tree
    (SpecInfer's tree attention mask, ``speculative/tree.py``). The tree is None for a causal
    window (every slot's parent the slot before it)."""
    from ..ops.engine import tree_paths

    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != t or mask.shape[3] != index + t or index == 0:
        return None
    seen = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    past, new = seen[:, :, :index], seen[:, :, index:]
    if not bool((past == past[:, :1]).all()):
        return None
    start = left_padding_start(past[:, 0], index)
    if start is None:
        return None
    order = torch.arange(t, device=mask.device)
    earlier = new & (order[None, None, :] < order[None, :, None])
    parents = torch.where(earlier, order[None, None, :], -1).amax(-1)
    _, ancestors = tree_paths(parents)
    if not torch.equal(ancestors, new):
        return None
    chain = bool((parents == order[None, :] - 1).all())
    return start, None if chain else parents.contiguous()
