"""The shared machinery of every family: transforms, registry, recipes, optimize/describe/restore."""

from .api import Description, RestoreReport, applied_transforms, describe, optimize, restore
from .generation import add_generate_hook
from .recipe import parse_recipe
from .registry import available, get_transform, register_transform
from .state import ModelState, state
from .transform import (
    Applied,
    ConfigError,
    ConflictError,
    InfertrixError,
    Stage,
    Transform,
    UnsupportedModelError,
)

__all__ = [
    "Applied",
    "ConfigError",
    "ConflictError",
    "Description",
    "InfertrixError",
    "ModelState",
    "RestoreReport",
    "Stage",
    "Transform",
    "UnsupportedModelError",
    "add_generate_hook",
    "applied_transforms",
    "available",
    "describe",
    "get_transform",
    "optimize",
    "parse_recipe",
    "register_transform",
    "restore",
    "state",
]
