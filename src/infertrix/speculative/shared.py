"""Drafting on the model's own KV cache: a draft made of the model's own layers needs no cache of its own.

A draft that is the model under other weights (its quantized copy: QSpec, Zhao et al. 2024,
https://arxiv.org/abs/2410.11305) or the model with layers skipped (Draft & Verify,
https://arxiv.org/abs/2309.08168; SWIFT, https://arxiv.org/abs/2410.06916) has the model's layer and
KV shapes, so it can draft over the keys and values the model wrote for the context: no cache to
fill, no catch-up over the prompt. Its own entries are cut away before the verification forward,
which then finds exactly the cache it would have found without drafting.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import DynamicCache

from ..kvcache.cache import GrowingCache
from ..skip import SkipPlan
from .ragged import RaggedKV


def share_cache(draft: nn.Module, model: nn.Module, kv: RaggedKV | None,
                skip: Callable[[], SkipPlan | None] | None = None) -> tuple[RaggedKV, Callable, str] | str:
    """(``kv``, a forward of ``draft`` over ``kv``'s cache, the path) when ``draft`` can draft on the
    model's own KV cache, else why not.

    QSpec (Zhao et al. 2024, https://arxiv.org/abs/2410.11305) drafts with a low-precision mode of
    the model over the *model's* KV cache and verifies at full precision: a draft that is the model
    under other weights (its quantized copy) has the same layers and KV shapes, so it needs no KV
    cache of its own and no catch-up over the prompt. Its draft tokens' keys and values are cut
    away before verification, which writes the model's own; the cached context the draft reads
    was written by the model (better keys and values than the draft's own would be). Only plain
    caches are shared: a KV policy would see the draft's queries (attention scores, evictions).
    ``skip()`` gives the skip plan a self-speculation draft runs (Draft & Verify and SWIFT draft on
    the model's cache the same way); skipped attention writes no keys for its layer, so layers end at
    different lengths while drafting: only the engine's cache, whose layers the drafter restores
    to their lengths afterwards, takes such a draft."""
    from ..core.generation import left_padding_start
    from ..engine.cache import EngineCache, EngineLayer
    from .aligned import AlignedKV
    from .lean import draft_runner

    if kv is None:
        return "no model cache was offered"
    shape = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "head_dim", "hidden_size")
    dc, mc = draft.config.get_text_config(decoder=True), model.config.get_text_config(decoder=True)
    if any(getattr(dc, a, None) != getattr(mc, a, None) for a in shape):
        return "the draft's layers differ from the model's"
    cache = kv.cache
    if isinstance(kv, AlignedKV) and isinstance(cache, EngineCache):
        if not all(type(layer) is EngineLayer for layer in cache.layers):
            return "the model's engine cache carries a KV policy"
        runner = draft_runner(draft)
        if runner is None:
            return "the draft does not run on the decode engine"

        def engine_forward(ids, mask, positions, keep):
            return runner.forward(ids, left_padding_start(mask, mask.shape[1]), positions.contiguous(), cache, keep,
                                  skip() if skip is not None else None)

        return kv, engine_forward, "engine, on the model's KV cache"
    if skip is not None:
        return "a skip plan's draft writes keys for some layers only, which only the engine's cache keeps apart"
    if type(cache) not in (GrowingCache, DynamicCache):
        return f"the model's cache is a {type(cache).__name__} (a KV policy or another layout)"

    def module_forward(ids, mask, positions, keep):
        return kv.logits_of(draft, ids, mask, positions, keep)

    return kv, module_forward, "module, on the model's KV cache"


def held_state(kv: RaggedKV) -> tuple:
    """What :func:`restore_shared` restores: each row's tokens, each engine layer's length."""
    from ..engine.cache import EngineLayer

    layers = [ly for ly in getattr(kv.cache, "layers", ()) if isinstance(ly, EngineLayer)]
    return kv.pos.clone(), layers, [ly.length for ly in layers]


def restore_shared(kv: RaggedKV, held: tuple) -> None:
    """Cut a shared cache back to what it ``held`` before drafting on it; engine layers get back their
    lengths (a skip plan's skipped attention left some at the old length, which the common cut would
    shorten; a cut moves only lengths, so their entries are intact)."""
    pos, layers, ends = held
    kv._rollback(pos)
    for ly, n in zip(layers, ends, strict=True):
        ly.length = n
