"""The one record infertrix keeps on a model: everything run-time, with a slot per family.

Transforms are pure configuration: applying one transform object to two models gives each model
its own results, kept here, never on the transform. The record lives in the model instance's
``__dict__`` (``model.__dict__["_infertrix"]``), so two models in one process carry different
transforms and nothing global is patched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from .model import tensor_bytes
from .transform import Applied

STATE_ATTR = "_infertrix"
# the instance-level wrapper through which the record's generate hooks run (core.generation)
GENERATE_ATTR = "generate"

Slot = TypeVar("Slot")


@dataclass
class ModelState:
    """What infertrix keeps on one model while it runs, in one place.

    ``applied``, ``generate_hooks`` and ``original_bytes`` belong to ``optimize``/``describe``/
    ``restore``; each family that keeps results per model has one slot, filled by the family and
    emptied by its undo: ``kvcache`` (:class:`infertrix.kvcache.attach.KVCacheSetup`),
    ``speculative`` (:class:`infertrix.speculative.state.SpeculativeState`: statistics, a
    quantized draft, searched plans, a lean decoder) and ``skip``
    (:class:`infertrix.skip.state.SkipState`: calibration measured on this model, AdaSkip's
    controller). Besides this record a model carries its ``generate`` wrapper while hooks are
    registered. What ``save_pretrained`` must write lives in ``model.config`` instead, where
    transformers reads it: ``config.quantization_config`` (quant and static skip plans, see
    :mod:`infertrix.quant.checkpoint`).
    """

    applied: list[Applied] = field(default_factory=list)
    generate_hooks: list[tuple[int, Callable]] = field(default_factory=list)
    original_bytes: int = 0
    defaults_off: dict[str, str] = field(default_factory=dict)  # default_on transform -> why not added
    kvcache: Any = None
    speculative: Any = None
    skip: Any = None


def state(model: nn.Module, create: bool = False) -> ModelState | None:
    """``model``'s record (created, counting its bytes as they are now, when ``create``)."""
    st = model.__dict__.get(STATE_ATTR)
    if st is None and create:
        st = ModelState(original_bytes=tensor_bytes(model))
        model.__dict__[STATE_ATTR] = st
    return st


def family_state(model: nn.Module, family: str, make: Callable[[], Slot] | None = None) -> Slot | None:
    """One family's slot of ``model``'s record; with ``make``, filled (record and all) when empty."""
    st = state(model, create=make is not None)
    if st is None:
        return None
    slot = getattr(st, family)
    if slot is None and make is not None:
        slot = make()
        setattr(st, family, slot)
    return slot


def copy_without_state(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` without the record or the generate wrapper: the copy starts
    with no transforms, its run-time state is not copied, and nothing of it points back at ``model``."""
    memo = dict(memo or {})
    own = {key: model.__dict__[key] for key in (STATE_ATTR, GENERATE_ATTR) if key in model.__dict__}
    for value in own.values():
        memo[id(value)] = None  # not copied at all
    out = copy.deepcopy(model, memo)
    for key in own:
        out.__dict__.pop(key, None)
    return out
