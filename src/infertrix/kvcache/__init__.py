"""KV-cache eviction, merging and quantization as transformers ``Cache`` policies.

    import infertrix as ix
    ix.optimize(model, ix.kvcache.SnapKV(compression=0.5))     # or "snapkv:0.5"
    ix.optimize(model, "kivi:4")                                # 4-bit KV, composes with a policy
    model.generate(**inputs)                                    # gets a fresh PolicyCache

See docs/kvcache.md.
"""

from .attach import new_cache
from .cache import (
    CacheCapabilities,
    CacheCropError,
    EvictingCache,
    EvictingLayer,
    GrowingCache,
    GrowingLayer,
    capabilities,
    full_attention_layers,
)
from .d2o import D2O
from .density import DensityKV
from .growing import GrowingKV, growing_cache
from .h2o import H2O
from .keyformer import Keyformer
from .kivi import KIVI
from .kivi_store import KIVIStore
from .knorm import KNorm
from .merge import merge_evicted
from .policy import KVPolicy, ScoreContext
from .policy_cache import LayerState, PolicyCache
from .pyramidkv import PyramidKV
from .rkv import RKV
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

POLICIES = (StreamingLLM, KNorm, SnapKV, H2O, TOVA, Keyformer, RKV, PyramidKV, D2O, DensityKV)

__all__ = [
    "CacheCapabilities",
    "D2O",
    "DensityKV",
    "EvictingCache",
    "EvictingLayer",
    "GrowingCache",
    "GrowingKV",
    "GrowingLayer",
    "H2O",
    "KIVI",
    "KIVIStore",
    "KNorm",
    "KVPolicy",
    "LayerState",
    "POLICIES",
    "PolicyCache",
    "PyramidKV",
    "RKV",
    "CacheCropError",
    "ScoreContext",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "Keyformer",
    "capabilities",
    "full_attention_layers",
    "merge_evicted",
    "new_cache",
    "growing_cache",
]
