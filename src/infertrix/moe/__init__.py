"""Mixture-of-Experts expert offloading: an expert store, a fast-memory cache, prefetch.

    import infertrix as ix
    ix.optimize(model, ix.moe.ExpertOffload(budget=0.25))   # or the recipe "offload:0.25"
    print(ix.describe(model))                                # hit rate, bytes read, stalls
"""

from .cache import ExpertCache, LayerStats
from .discovery import MoELayer, find_moe_layers
from .experts import OffloadedExperts, OffloadRuntime
from .loading import load_offloaded
from .miss_policy import MissPolicy
from .offload import ExpertOffload, offload_runtime
from .prefetch import Prefetcher, PrefetchError
from .store import ExpertStore
from .topk import ReduceTopK

__all__ = [
    "ExpertCache",
    "ExpertOffload",
    "ExpertStore",
    "LayerStats",
    "MissPolicy",
    "MoELayer",
    "OffloadRuntime",
    "OffloadedExperts",
    "PrefetchError",
    "Prefetcher",
    "ReduceTopK",
    "find_moe_layers",
    "load_offloaded",
    "offload_runtime",
]
