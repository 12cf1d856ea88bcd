"""KV-cache eviction, merging and quantization as transformers ``Cache`` policies.

    import infertrix as ix
    ix.optimize(model, ix.kvcache.SnapKV(compression=0.5))     # or "snapkv:0.5"
    ix.optimize(model, "kivi:4")                                # 4-bit KV, composes with a policy
    model.generate(**inputs)                                    # gets a fresh PolicyCache

See docs/kvcache.md.
"""

from .attach import new_cache
from .cache import CacheCropError, KVQuantSpec, PolicyCache, PolicyLayer
from .d2o import D2O, merge_evicted
from .density import DensityKV
from .growing import GrowingCache, GrowingKV, GrowingLayer, growing_cache
from .h2o import H2O
from .keyformer import Keyformer
from .kivi import KIVI
from .knorm import KNorm
from .policy import KVPolicy, ScoreContext
from .pyramidkv import PyramidKV
from .rkv import RKV
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

POLICIES = (StreamingLLM, KNorm, SnapKV, H2O, TOVA, Keyformer, RKV, PyramidKV, D2O, DensityKV)

__all__ = [
    "D2O",
    "DensityKV",
    "GrowingCache",
    "GrowingKV",
    "GrowingLayer",
    "H2O",
    "KIVI",
    "KNorm",
    "KVPolicy",
    "KVQuantSpec",
    "POLICIES",
    "PolicyCache",
    "PolicyLayer",
    "PyramidKV",
    "RKV",
    "CacheCropError",
    "ScoreContext",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "Keyformer",
    "merge_evicted",
    "new_cache",
    "growing_cache",
]
