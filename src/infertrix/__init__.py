"""infertrix: drop-in, composable inference-optimization transforms for transformers models.

    import infertrix as ix
    ix.optimize(model, "w4a8,snapkv:0.5")   # or transform objects
    print(ix.describe(model))
    ix.restore(model)

``import infertrix`` is cheap: the families, the kernels and the names re-exported from
``infertrix.core`` load on first use (PEP 562), so that ``infertrix --help`` and ``--version``
answer without importing torch and transformers (seconds). A registry lookup (a recipe,
``available()``) first imports every family, so it sees every transform whichever names were
touched first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names; at run time __getattr__ provides them on first use.
__all__ = [
    "Applied",
    "ConfigError",
    "ConflictError",
    "InfertrixError",
    "Stage",
    "Transform",
    "UnsupportedModelError",
    "available",
    "describe",
    "eval",
    "models",
    "kvcache",
    "moe",
    "ops",
    "optimize",
    "parse_recipe",
    "quant",
    "register_transform",
    "restore",
    "skip",
    "speculative",
]
# The submodules among them; loading them all registers every transform.
_SUBMODULES = ("eval", "kvcache", "models", "moe", "ops", "quant", "skip", "speculative")

if TYPE_CHECKING:  # what static tools see
    from . import eval, kvcache, models, moe, ops, quant, skip, speculative
    from .core import (
        Applied,
        ConfigError,
        ConflictError,
        InfertrixError,
        Stage,
        Transform,
        UnsupportedModelError,
        available,
        describe,
        optimize,
        parse_recipe,
        register_transform,
        restore,
    )


def _load_all() -> None:
    """Import every submodule, registering every transform; idempotent.

    The registry calls this before a lookup, so recipes and ``available()`` see every family
    whichever names were touched first.
    """
    for name in _SUBMODULES:
        importlib.import_module(f".{name}", __name__)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in __all__:
        value = getattr(importlib.import_module(".core", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
