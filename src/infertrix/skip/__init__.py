"""Training-free layer and sublayer skipping: plans, strategies, and a toggle for self-speculation.

    from infertrix.skip import ShortGPT, SkipPlan
    plan = ShortGPT(fraction=0.2, tokenizer=tok).plan(model)   # calibrate once
    plan.save("shortgpt.json")
    with plan.active(model):          # draft with the plan, same weights and KV cache
        ...
    ix.optimize(model, "shortgpt:0.2")  # or apply it for good (undone by ix.restore)
"""

from .adaskip import AdaSkip
from .apply_plan import ApplySkipPlan
from .attention_drop import AttentionDrop
from .calibration import Similarities, SimilarityRecorder, measure_similarities
from .modules import SkippedAttention, SkippedLayer, SkippedMLP
from .plan import (
    SUBLAYERS,
    SkipEntry,
    SkipHandle,
    SkipPlan,
    SublayerCosts,
    anchor_layers,
    rollback_cache,
    skipping,
)
from .shortgpt import ShortGPT
from .skipdecode import ScheduledLayer, SkipDecode
from .state import SkipState, skip_state
from .strategy import SkipStrategy
from .uniform import UniformSkip

__all__ = [
    "SUBLAYERS",
    "AdaSkip",
    "ApplySkipPlan",
    "AttentionDrop",
    "ScheduledLayer",
    "ShortGPT",
    "Similarities",
    "SimilarityRecorder",
    "SkipDecode",
    "SkipEntry",
    "SkipHandle",
    "SkipPlan",
    "SkipState",
    "SkipStrategy",
    "SkippedAttention",
    "SkippedLayer",
    "SkippedMLP",
    "SublayerCosts",
    "UniformSkip",
    "anchor_layers",
    "measure_similarities",
    "rollback_cache",
    "skip_state",
    "skipping",
]
