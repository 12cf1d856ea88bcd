"""One registry of transforms by recipe name; families register their classes on import.

``import infertrix`` loads the families lazily (so the CLI starts fast); lookups here load them
first, so the registry is complete even for code that imports ``infertrix.core`` directly.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .transform import ConfigError, Transform

_REGISTRY: dict[str, type[Transform]] = {}


def register_transform(name: str, *aliases: str):
    """Class decorator: make a Transform subclass available to recipes as ``name``."""

    def deco(cls: type[Transform]) -> type[Transform]:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"register_transform expects a Transform subclass, got {cls!r}")
        for key in (name, *aliases):
            key = key.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"transform name {key!r} is already taken by {_REGISTRY[key].__name__}")
            _REGISTRY[key] = cls
        cls.name = name.lower()
        cls.aliases = tuple(a.lower() for a in aliases)
        return cls

    return deco


def _load_families() -> None:
    from .. import _load_all

    _load_all()


def get_transform(name: str) -> type[Transform]:
    """The transform class registered as ``name`` or one of its aliases (case-insensitive)."""
    _load_families()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(n for n in available() if not n.startswith("_"))) or "(none registered)"
        hint = did_you_mean(name.lower(), [n for n in _REGISTRY if not n.startswith("_")])
        raise ConfigError(f"unknown transform {name!r}{hint}; available: {known}") from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (empty when none is close)."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def available(family: str | None = None) -> dict[str, type[Transform]]:
    """Registered transforms by their canonical name (aliases left out: see ``cls.aliases``).

    ``family`` (``"kvcache"``, ``"quant"``...) keeps one family's (see :func:`family_of`). This is
    the one list of methods: tests, benchmarks and docs checks read it, so a new method is its file
    and the import line in its family's ``__init__``.
    """
    _load_families()
    out = {cls.name: cls for cls in _REGISTRY.values()}
    if family is not None:
        out = {name: cls for name, cls in out.items() if family_of(cls) == family}
    return out


def family_of(cls: type[Transform]) -> str | None:
    """The family package (``kvcache``, ``skip``...) of ``cls`` or of its nearest infertrix base, so a
    method defined outside the package (a user's, a test's ``KVPolicy`` subclass) joins its base's family."""
    for klass in cls.__mro__:
        parts = klass.__module__.split(".")
        if parts[0] == "infertrix" and len(parts) > 2 and parts[1] != "core":
            return parts[1]
    return None
