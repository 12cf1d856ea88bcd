"""infertrix: drop-in, composable inference-optimization transforms for transformers models.

    import infertrix as ix
    ix.optimize(model, "w4a8,snapkv:0.5")   # or transform objects
    print(ix.describe(model))
    ix.restore(model)
"""

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

__version__ = "0.1.0"

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
