"""infertrix: drop-in, composable inference-optimization transforms for transformers models.

    import infertrix as ix
    ix.optimize(model, "w4a8,snapkv:0.5")   # or transform objects
    print(ix.describe(model))
    model.save_pretrained(path)   # AutoModelForCausalLM.from_pretrained(path) rebuilds it (infertrix imported)
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

# transformers' from_pretrained loads infertrix checkpoints once infertrix is imported
from .quant.hf_quantizer import register as _register_hf_quantizer  # noqa: E402

_register_hf_quantizer()

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
