"""KV-cache eviction, merging and quantization as transformers ``Cache`` policies.

    import infertrix as ix
    ix.optimize(model, ix.kvcache.SnapKV(compression=0.5))     # or "snapkv:0.5"
    ix.optimize(model, "kivi:4")                                # 4-bit KV, composes with a policy
    model.generate(**inputs)                                    # gets a fresh PolicyCache

See docs/kvcache.md.
"""

# A method is one import line here, ``from .x import X as X``: importing its file registers it
# (``infertrix.available("kvcache")`` is the one list of methods) and ``as X`` marks the re-export,
# so no second list has to name it.
from ..core import Transform
from .adakv import AdaKV as AdaKV
from .adakv import AdaKVzip as AdaKVzip
from .attach import new_cache
from .cache import (
    CacheCropError,
    EvictingCache,
    EvictingLayer,
    GrowingCache,
    GrowingLayer,
    full_attention_layers,
)
from .cake import CAKE as CAKE
from .capabilities import CacheCapabilities, capabilities
from .chunkkv import ChunkKV as ChunkKV
from .context import ScoreContext
from .d2o import D2O as D2O
from .density import DensityKV as DensityKV
from .expected_attention import ExpectedAttention as ExpectedAttention
from .globalkvzip import GlobalKVzip as GlobalKVzip
from .growing import GrowingKV as GrowingKV
from .growing import growing_cache
from .h2o import H2O as H2O
from .keydiff import KeyDiff as KeyDiff
from .keyformer import Keyformer as Keyformer
from .kivi import KIVI as KIVI
from .kivi_store import KIVIStore
from .knorm import KNorm as KNorm
from .kvzip import KVzip as KVzip
from .lagkv import LagKV as LagKV
from .merge import merge_evicted
from .policy import KVPolicy
from .policy_cache import LayerState, PolicyCache
from .pyramidkv import PyramidKV as PyramidKV
from .rkv import RKV as RKV
from .snapkv import SnapKV as SnapKV
from .streaming_llm import StreamingLLM as StreamingLLM
from .tova import TOVA as TOVA

__all__ = [
    "CacheCapabilities",
    "CacheCropError",
    "EvictingCache",
    "EvictingLayer",
    "GrowingCache",
    "GrowingLayer",
    "KIVIStore",
    "KVPolicy",
    "LayerState",
    "PolicyCache",
    "ScoreContext",
    "capabilities",
    "full_attention_layers",
    "growing_cache",
    "merge_evicted",
    "new_cache",
    # and every method imported above
    *sorted(n for n, v in dict(globals()).items() if isinstance(v, type) and issubclass(v, Transform) and v.name),
]
