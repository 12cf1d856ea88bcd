"""infertrix: drop-in, composable inference-optimization transforms for transformers models.

    import infertrix as ix
    ix.optimize(model, "w4a8,snapkv:0.5")   # or transform objects
    print(ix.describe(model))
    model.save_pretrained(path)   # AutoModelForCausalLM.from_pretrained(path) rebuilds it (infertrix imported)
    ix.restore(model)

``import infertrix`` is cheap: the families, the kernels and the names re-exported from
``infertrix.core`` load on first use (PEP 562), so that ``infertrix --help`` and ``--version``
answer without importing torch and transformers (seconds). A registry lookup (a recipe,
``available()``) first imports every family, so it sees every transform whichever names were
touched first.

transformers' ``from_pretrained`` loads infertrix checkpoints once infertrix is imported: the
quantizer is registered with transformers as soon as transformers' quantizer registry exists
(at once if it is already imported, else right after transformers imports it), so this cheap
import still does not import transformers itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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
    "engine",
    "eval",
    "export",
    "models",
    "kvcache",
    "linear",
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
_SUBMODULES = ("engine", "eval", "kvcache", "linear", "models", "moe", "ops", "quant", "skip", "speculative")

if TYPE_CHECKING:  # what static tools see
    from . import engine, eval, kvcache, linear, models, moe, ops, quant, skip, speculative
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
    from .quant.export import export


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
    elif name == "export":  # a function (quant/export.py), not a submodule
        value = importlib.import_module(".quant.export", __name__).export
    elif name in __all__:
        value = getattr(importlib.import_module(".core", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_HF_REGISTRY = "transformers.quantizers.auto"


def _register_hf_quantizer() -> None:
    try:  # the module registers itself when imported (it may be mid-import already: then it finishes)
        importlib.import_module(".quant.hf_quantizer", __name__)
    except Exception as exc:  # noqa: BLE001 - never break transformers' own import
        warnings.warn(f"infertrix could not register its checkpoint loader with transformers: {exc}", stacklevel=2)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_hf_quantizer` right after transformers imports its quantizer registry
    (one shot: it removes itself on first use)."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname != _HF_REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):  # noqa: ANN001
            exec_module(module)
            _register_hf_quantizer()

        spec.loader.exec_module = exec_then_register
        return spec


if _HF_REGISTRY in sys.modules:
    _register_hf_quantizer()
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
