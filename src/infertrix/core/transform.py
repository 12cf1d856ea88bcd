"""The base of every infertrix transform: a validated dataclass config with an ``apply`` step.

A transform is pure configuration (its hyper-parameters are dataclass fields) plus
``apply(model) -> Applied``. Nothing global is patched: ``apply`` changes only the model it is
given (module swaps, hooks, an instance-level ``generate`` wrapper), so two models in one process
can carry different transforms. Shared machinery lives here once; a method's file holds only
what is specific to it (the pattern of kvpress's presses and torchao's configs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from torch import nn


class Stage(IntEnum):
    """Where a transform acts; ``optimize`` applies transforms in this order."""

    WEIGHTS = 0  # module swaps of linear layers (quantization)
    EXPERTS = 1  # MoE expert placement (offloading)
    KERNELS = 2  # faster kernels for the float layers that remain (same weights, same results)
    LAYERS = 3  # which layers/sublayers run (skipping)
    CACHE = 4  # the KV cache policy used by generate
    DECODING = 5  # the decoding loop (speculative decoding)


class InfertrixError(ValueError):
    """Base class of infertrix's configuration errors."""


class ConfigError(InfertrixError):
    """A transform's hyper-parameters are invalid."""


class UnsupportedModelError(InfertrixError):
    """The model's architecture or state is not supported by a transform."""


class ConflictError(InfertrixError):
    """Two transforms cannot be combined on one model."""


@dataclass
class Applied:
    """What ``apply`` did to one model: enough to describe it and, where possible, undo it.

    ``undo`` restores the model exactly; when it is None, ``irreversible_reason`` says why the
    transform cannot be undone. ``report`` returns live figures for ``describe`` (bytes
    before/after, kernel backend in use, hit rates...).
    """

    transform: Transform
    undo: Callable[[], None] | None = None
    irreversible_reason: str | None = None
    report: Callable[[], dict[str, Any]] = field(default=lambda: {})

    @property
    def reversible(self) -> bool:
        return self.undo is not None


@dataclass
class Transform:
    """Base class: subclass as a ``@dataclass`` and register it with ``@register_transform``.

    Class attributes a subclass sets:
      - ``stage``: its :class:`Stage`.
      - ``conflict_group``: transforms sharing a group cannot both be on a model (for example
        two eviction policies); None means it combines with anything.
      - ``primary``: the field a recipe's ``name:value`` sets (``"snapkv:0.5"``).
      - ``bench_recipe`` (optional): the recipe ``infertrix bench --all-recipes`` runs for this
        transform (default: its name with default fields; None: skip, e.g. it needs a draft model).
      - ``use_when``: one line saying when to reach for this transform (the benchmark tables print
        it beside the figures that back it).
    Methods a subclass overrides: ``validate`` (raise :class:`ConfigError` naming the fix),
    ``check_model`` (raise :class:`UnsupportedModelError`), and ``apply``.
    """

    stage: ClassVar[Stage]
    name: ClassVar[str] = ""  # set by register_transform
    conflict_group: ClassVar[str | None] = None
    primary: ClassVar[str | None] = None
    use_when: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; raise ConfigError with a message that names the fix."""

    def check_model(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError if this transform cannot act on ``model``."""

    def apply(self, model: nn.Module) -> Applied:
        raise NotImplementedError(f"{type(self).__name__}.apply")

    def params(self) -> dict[str, Any]:
        """The hyper-parameters, for describe() and benchmark tables."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, int | float | str | bool | type(None)) else repr(v)
        return out

    def recipe(self) -> str:
        """The recipe string that rebuilds this transform (round-trips through parse_recipe)."""
        args = []
        for f in dataclasses.fields(self):
            if not f.init or not f.repr:
                continue
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            if v != default and isinstance(v, int | float | str | bool | type(None)):
                args.append(f"{f.name}={v}")
        return self.name + (f"({','.join(args)})" if args else "")
