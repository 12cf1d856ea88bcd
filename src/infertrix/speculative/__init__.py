"""Lossless speculative decoding: drafters and one exact verifier.

    import infertrix as ix
    ix.optimize(model, ix.speculative.PromptLookup(num_tokens=10))
    model.generate(**inputs, max_new_tokens=200)      # same tokens as without it (greedy)
    print(ix.speculative.speculative_stats(model).last.mean_accepted_length)

See docs/speculative.md.
"""

from .budget import AcceptanceRate, VerifyCost, best_length, expected_tokens
from .cascade import Cascade
from .draft_model import DraftModel, DraftModelDrafter, check_same_vocabulary
from .drafter import Draft, DraftContext, Drafter
from .gain import GainGuard, GainMemory
from .jacobi import Jacobi, JacobiDrafter
from .lookahead import Lookahead, LookaheadDrafter, NGramTrie
from .loop import SpeculativeGenerate
from .prompt_lookup import PromptLookup, PromptLookupDrafter
from .quantized_self import QuantizedSelf, quantized_copy
from .self_speculative import SelfSpeculative
from .stats import SpeculativeStats, StatsRecord
from .transform import SpeculativeDecoding, speculative_stats
from .tree import TokenTree
from .verify import verify_greedy, verify_sampling

__all__ = [
    "AcceptanceRate",
    "Cascade",
    "Draft",
    "DraftContext",
    "DraftModel",
    "DraftModelDrafter",
    "Drafter",
    "GainGuard",
    "GainMemory",
    "Jacobi",
    "JacobiDrafter",
    "Lookahead",
    "LookaheadDrafter",
    "NGramTrie",
    "PromptLookup",
    "PromptLookupDrafter",
    "QuantizedSelf",
    "SelfSpeculative",
    "SpeculativeDecoding",
    "SpeculativeGenerate",
    "SpeculativeStats",
    "StatsRecord",
    "TokenTree",
    "VerifyCost",
    "best_length",
    "check_same_vocabulary",
    "expected_tokens",
    "quantized_copy",
    "speculative_stats",
    "verify_greedy",
    "verify_sampling",
]
