"""The decode engine: a supported model's decoder stack run as a few invariant kernels per layer.

``infertrix.optimize(model, "w4a8,engine")`` makes ``generate`` (and any forward given an
:class:`EngineCache`) take the engine; ``describe`` says which path each forward took and why.
See docs/engine.md for what runs, the invariance guarantee and the fallbacks.
"""

from .cache import EngineCache, EngineLayer
from .plan import SUPPORTED, why_unsupported
from .transform import Engine, engine_runtime

__all__ = ["SUPPORTED", "Engine", "EngineCache", "EngineLayer", "engine_runtime", "why_unsupported"]
