"""The base of every infertrix transform: a validated dataclass config with an ``apply`` step.

A transform is pure configuration (its hyper-parameters are dataclass fields) plus
``apply(model) -> Applied``. Nothing global is patched: ``apply`` changes only the model it is
given (module swaps, hooks, an instance-level ``generate`` wrapper), so two models in one process
can carry different transforms. Shared machinery lives here once; a method's file holds only
what is specific to it (the pattern of kvpress's presses and torchao's configs).
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from torch import Tensor, nn


class Stage(IntEnum):
    """Where a transform acts; ``optimize`` applies transforms in this order."""

    WEIGHTS = 0  # module swaps of linear layers (quantization)
    EXPERTS = 1  # MoE expert placement (offloading)
    KERNELS = 2  # faster kernels for the float layers that remain (same weights, same results)
    LAYERS = 3  # which layers/sublayers run (skipping)
    CACHE = 4  # the KV cache policy used by generate
    DECODING = 5  # the decoding loop (speculative decoding)

    @property
    def acts_through_generate(self) -> bool:
        """Cache policies and decoding loops change ``model.generate``; a model needs one."""
        return self >= Stage.CACHE


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
    before/after, kernel backend in use, hit rates...); report byte counts in bytes, under keys
    ending in ``bytes`` (``describe``'s text shows them in MiB). ``held`` returns the tensors the
    transform keeps alive outside the model's modules (float layers kept for ``restore``, a draft
    model's weights), which ``describe`` counts in the model's bytes.
    """

    transform: Transform
    undo: Callable[[], None] | None = None
    irreversible_reason: str | None = None
    report: Callable[[], dict[str, Any]] = field(default=lambda: {})
    held: Callable[[], Iterable[Tensor]] = field(default=lambda: ())
    by_default: bool = False  # set by ``optimize`` on a transform it added on its own (``Transform.default_on``)

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
      - ``default_on``: ``optimize`` adds it, with its default fields, to every model that can take
        it (see :meth:`default_problem`) unless the call or the model already has one; such a
        record is lifted off and put back last by each later ``optimize`` call, so it never
        stands in the way of the stage order.
      - ``same_weights``: True for a transform that changes only how the same weights are run
        (the decode engine), so exporting the model has nothing of it to carry.
    Methods a subclass overrides: ``validate`` (raise :class:`ConfigError` naming the fix),
    ``check_model`` (raise :class:`UnsupportedModelError`), and ``apply``.
    """

    stage: ClassVar[Stage]
    name: ClassVar[str] = ""  # set by register_transform
    aliases: ClassVar[tuple[str, ...]] = ()  # set by register_transform
    conflict_group: ClassVar[str | None] = None
    primary: ClassVar[str | None] = None
    use_when: ClassVar[str] = ""
    default_on: ClassVar[bool] = False
    same_weights: ClassVar[bool] = False  # only how the model runs: a saved or exported checkpoint needs nothing of it

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; raise ConfigError with a message that names the fix."""

    def check_model(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError if this transform cannot act on ``model``."""

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        """Why this transform cannot act on ``model`` sharded by transformers' tensor parallelism
        (``tp``: :class:`~infertrix.core.parallel.TensorParallel`), or None when it can. Asked only
        of sharded models; a family that works on shards (tested under torchrun) overrides it."""
        return "it has not been made to work on tensor-parallel shards; load the model without tp_plan"

    def default_problem(self, model: nn.Module) -> str | None:
        """Why ``optimize`` should not add this ``default_on`` transform to ``model`` on its own
        (``describe`` shows the reason), or None."""
        return None

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

    def changed_params(self) -> dict[str, Any]:
        """The hyper-parameters that differ from the defaults (what ``describe``'s text lists)."""
        out = self.params()
        for f in dataclasses.fields(self):
            if f.name in out and _default(f) is not dataclasses.MISSING and _same(getattr(self, f.name), _default(f)):
                del out[f.name]
        return out

    def recipe(self) -> str:
        """The recipe string that rebuilds this transform (round-trips through parse_recipe)."""
        args = []
        for f in dataclasses.fields(self):
            if not f.init or not f.repr:
                continue
            v = getattr(self, f.name)
            if not _same(v, _default(f)) and isinstance(v, int | float | str | bool | type(None)):
                args.append(f"{f.name}={v}")
        return self.name + (f"({','.join(args)})" if args else "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a tensor, or an object without a plain ==
        return a is b


# --- field types: a config's plain fields (int, float, bool, str, or None) are checked on construction
_PLAIN = (int, float, bool, str, type(None))
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None"}


def plain_field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Field name -> the plain types its annotation allows (``float | None`` -> (float, NoneType)),
    for the fields annotated with plain types only (others, ``Any`` or a callable, are left out)."""
    out: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(cls):
        ann = f.type
        if isinstance(ann, str):  # `from __future__ import annotations`: resolve in the declaring module
            owner = next((c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {})), cls)
            try:
                ann = eval(ann, dict(vars(sys.modules[owner.__module__])))  # noqa: S307 (our own annotations)
            except Exception:
                continue
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else (ann,)
        if args and all(a in _PLAIN for a in args):
            out[f.name] = tuple(args)
    return out


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, but true/false is no count or fraction
        return bool in allowed
    if value is None:
        return type(None) in allowed
    if isinstance(value, numbers.Integral):
        return int in allowed or float in allowed or (bool in allowed and value in (0, 1))
    if isinstance(value, numbers.Real):
        return float in allowed
    if isinstance(value, str):
        return str in allowed
    return True  # another object (a Path, a torch.device): the transform's validate() judges it


def check_field_types(config: Transform) -> None:
    """Raise ConfigError naming the field and what it takes when a plain field holds another kind
    of value (``snapkv:abc``, ``PromptLookup(num_tokens=2.5)``)."""
    for name, allowed in plain_field_types(type(config)).items():
        value = getattr(config, name)
        if not _fits(value, allowed):
            want = " or ".join(_KIND[t] for t in allowed)
            raise ConfigError(f"{type(config).__name__}.{name} takes {want}, got {value!r}")
