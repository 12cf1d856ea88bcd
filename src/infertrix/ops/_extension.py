"""Loading the compiled extension ``infertrix._C``, never compiling it.

The extension is built ahead of time by ``pip install --no-build-isolation -e .``. Importing it
registers its CPU (and CUDA) kernels for ops that ``infertrix.ops`` has already declared. When it
is missing, fails to load, or was built against another torch, every op runs its PyTorch
reference and :func:`infertrix.ops.status` says why.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """Import ``infertrix._C`` once; return it, or None (the reason is in :func:`load_error`)."""
    global _module, _error, _loaded
    if _loaded:
        return _module
    _loaded = True
    if os.environ.get("INFERTRIX_DISABLE_EXTENSION") == "1":
        _error = "disabled by INFERTRIX_DISABLE_EXTENSION=1"
        return None
    try:
        module = importlib.import_module("infertrix._C")
    except ImportError as exc:  # not built, or built against another torch (undefined symbols)
        _error = (
            f"not loaded ({exc}); build it with `pip install --no-build-isolation -e .` "
            "in an environment that has torch"
        )
        return None
    built = getattr(module, "built_with_torch", None)
    if built != torch.__version__:
        # A mismatch usually fails at import already; refusing here also covers ABI-compatible
        # builds whose kernels were checked against another torch.
        _error = f"built for torch {built}, running torch {torch.__version__}; rebuild it"
        return None
    _module = module
    return module


def load_error() -> str | None:
    return _error
