"""Attaching KV-cache transforms to one model: a generate hook and one hook pair per attention module.

``KVCacheSetup`` is the per-model record shared by the eviction policy and KV quantization (they
compose: evict, then store the kept tokens in few bits). While either is applied:

- ``generate`` gets a fresh :class:`~.policy_cache.PolicyCache` whenever the caller passes no
  ``past_key_values`` (through :func:`infertrix.core.generation.add_generate_hook`; nothing in
  transformers is patched);
- each full-attention module carries a forward pre-hook (gives a layer that holds fewer tokens than
  the longest one the suffix of the shared 4D mask that matches it) and a forward hook (runs the
  policy after the layer's attention through :meth:`PolicyCache.after_attention`: queries are
  recomputed from the module's input, the layer is compressed, quantized tokens are flushed). Hooks
  read only the attention module's public forward arguments (``hidden_states``,
  ``position_embeddings``, ``attention_mask``, the cache), and do nothing unless the cache is a
  ``PolicyCache`` (the pre-hook also folds slots a policy hides per KV head, AdaKV's, into the mask);
- the model carries a forward hook that runs the policy's ``after_forward`` once the whole forward is
  done (KVzip scores the prompt with a second forward through the model there);
- the model carries a forward pre-hook that records the token ids each forward feeds a
  ``PolicyCache`` (the next turn of a chat is checked against them, :mod:`~.turns`), and warns, once
  per model, when a plain forward (several tokens, no cache passed: what log-likelihood harnesses
  run) bypasses the transforms, naming the honest ways to score (``infertrix.eval.loglikelihood``,
  ``infertrix.eval.compressed_scoring``);
- a ``generate`` call on a ``PolicyCache`` that has seen tokens (the next turn of a chat) is checked
  before it runs (:func:`~.turns.check_next_turn`); one given another cache (a ``DynamicCache``)
  warns once per model that the transforms do not act on it.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import Tensor, nn

from ..core import Stage, UnsupportedModelError
from ..core.attention import SDPA_ATTENTION
from ..core.generation import add_generate_hook, cache_argument, cache_argument_name
from ..core.model import decoder_layers, text_config
from ..core.state import family_state, state
from .attention import hide_slots
from .cache import EvictingLayer, full_attention_layers
from .compile_guard import EagerWhileCompressing
from .policy_cache import HIDDEN, CompressionLog, PolicyCache
from .rows import hidden_slots_of
from .turns import check_next_turn

# KIVI's attention function (registered with transformers' AttentionInterface in kivi.py): sdpa,
# except for decoding steps over quantized tokens, which it reads from their codes
KIVI_ATTENTION = "infertrix_kivi"
SUPPORTED_ATTENTION = ("sdpa", "eager", KIVI_ATTENTION, SDPA_ATTENTION)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = []
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise UnsupportedModelError(
                f"{type(layer).__name__} has no `self_attn`; infertrix.kvcache supports decoder layers with a "
                "standard attention module (Llama, Qwen2/3, Mistral, Gemma 3)"
            )
        mods.append(attn)
    return mods


def generate_leaves_cache_to_us(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """True when a ``generate`` call would build transformers' default cache: the caller passes no
    ``past_key_values``, does not turn the cache off and names no ``cache_implementation`` (in the
    call or the model's generation config). A transform may then supply its own cache."""
    if cache_argument(kwargs) is not None or kwargs.get("use_cache", True) is False:
        return False
    gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(gen_cfg, "cache_implementation", None) is None and "cache_implementation" not in kwargs


def stores_kv(attn: nn.Module) -> bool:
    """False for stand-in attention modules that write nothing to the cache (``stores_kv = False``)."""
    return getattr(attn, "stores_kv", True)


def check_supported_model(model: nn.Module, transform, needs_queries: bool) -> None:
    """Raise UnsupportedModelError unless ``transform`` can run on ``model``."""
    name = type(transform).__name__
    cfg = text_config(model)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"{name} supports attn_implementation 'sdpa' or 'eager', the model uses {impl!r}; load it with "
            "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )
    full = full_attention_layers(model.config)
    if not full:
        raise UnsupportedModelError(f"{name}: the model has no full-attention layer to compress")
    mods = _attention_modules(model)
    for i in full:
        attn = mods[i]
        if not stores_kv(attn):  # e.g. a layer skipped by infertrix.skip: nothing to compress there
            continue
        if getattr(attn, "layer_idx", i) != i:
            raise UnsupportedModelError(
                f"{name}: attention module {i} has layer_idx {attn.layer_idx}"
            )
        if needs_queries:
            missing = [a for a in ("q_proj", "head_dim", "scaling") if not hasattr(attn, a)]
            if missing:
                raise UnsupportedModelError(
                    f"{name} recomputes queries and needs {missing} on {type(attn).__name__}; use a score-only "
                    "policy (KNorm, StreamingLLM) for this model"
                )
            if getattr(cfg, "attn_logit_softcapping", None):
                raise UnsupportedModelError(
                    f"{name} does not model attention logit soft-capping ({type(attn).__name__}); use KNorm or "
                    "StreamingLLM"
                )


class KVCacheSetup:
    """The KV-cache transforms on one model, their hooks and the last cache handed to ``generate``."""

    def __init__(self, model: nn.Module) -> None:
        self.model_ref = weakref.ref(model)
        self.policy = None
        self.quant = None  # the KIVI transform
        self.handles: list = []
        self.remove_generate = None
        self.last_cache_ref = None
        self.last_stats: dict[str, Any] | None = None
        self.scoring: int | None = None  # chunk length while infertrix.eval.compressed_scoring is active
        self.warned_plain_forward = False
        self.warned_other_cache = False
        self.row_masks: dict[int, Tensor | None] = {}  # layer -> its 4D mask before hidden slots were folded in
        self.log = CompressionLog()  # counted over every cache handed out, for describe()

    # -- lifecycle -------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self.handles:
            return
        model = self.model_ref()
        mods = _attention_modules(model)
        for idx in full_attention_layers(model.config):
            mod = mods[idx]
            self.handles.append(mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post_hook, with_kwargs=True))
        self.handles.append(model.register_forward_pre_hook(self._plain_forward_hook, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._forward_hook, with_kwargs=True))
        self.handles.extend(EagerWhileCompressing().install(model))  # torch.compile: see compile_guard
        self.remove_generate = add_generate_hook(model, self._generate_hook, order=int(Stage.CACHE))

    def _uninstall_if_empty(self) -> None:
        if self.policy is not None or self.quant is not None:
            return
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.remove_generate is not None:
            self.remove_generate()
            self.remove_generate = None
        model = self.model_ref()
        st = state(model) if model is not None else None
        if st is not None:
            st.kvcache = None

    def set_policy(self, policy):
        self.policy = policy
        self.log = CompressionLog()
        self._install()

        def undo() -> None:
            self.policy = None
            self._uninstall_if_empty()

        return undo

    def set_quant(self, quant):
        self.quant = quant
        self._install()

        def undo() -> None:
            self.quant = None
            self._uninstall_if_empty()

        return undo

    # -- caches ------------------------------------------------------------------------------------------
    def new_cache(self) -> PolicyCache:
        cache = PolicyCache(self.model_ref().config, self.policy, self.quant, self.log)
        self.last_cache_ref = weakref.ref(cache)
        return cache

    def _generate_hook(self, model, args: tuple, kwargs: dict[str, Any]):
        if generate_leaves_cache_to_us(model, kwargs):
            kwargs[cache_argument_name(model)] = self.new_cache()
        cache = cache_argument(kwargs)
        if isinstance(cache, PolicyCache):
            check_next_turn(cache, args, kwargs)  # a chat's next turn must continue what it has seen
        elif cache is not None and not self.warned_other_cache and (names := self.bypassed_transforms()):
            self.warned_other_cache = True
            warnings.warn(
                f"infertrix: {' and '.join(names)} {'acts' if len(names) == 1 else 'act'} only on an infertrix "
                f"PolicyCache, and generate was given a {type(cache).__name__}, which it fills uncompressed. To reuse "
                "one compressed cache across turns pass cache=infertrix.kvcache.new_cache(model), or pass none and "
                "continue on the one generate returns (return_dict_in_generate=True). Warned once per model.",
                UserWarning,
                stacklevel=3,
            )
        return args, kwargs

    # -- hooks -------------------------------------------------------------------------------------------
    def bypassed_transforms(self) -> list[str]:
        """The applied transforms a forward without a cache leaves out (a no-op policy changes nothing)."""
        names = [] if self.policy is None or self.policy.is_noop else [type(self.policy).__name__]
        return names + ([type(self.quant).__name__] if self.quant is not None else [])

    def _plain_forward_hook(self, model, args, kwargs):
        cache = cache_argument(kwargs)
        if isinstance(cache, PolicyCache):
            ids = kwargs.get("input_ids", args[0] if args else None)
            fed = ids if isinstance(ids, Tensor) else kwargs.get("inputs_embeds")
            if isinstance(fed, Tensor) and fed.dim() >= 2:
                cache.note_pads(kwargs.get("attention_mask"), fed.shape[1])  # before note_tokens: seen so far
            cache.note_tokens(ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None)
        if self.warned_plain_forward or self.scoring is not None or cache is not None:
            return None
        seq = kwargs.get("input_ids", args[0] if args else None)
        if seq is None:
            seq = kwargs.get("inputs_embeds")
        if not isinstance(seq, Tensor) or seq.dim() < 2 or seq.shape[1] <= 1 or len(args) > 3:
            return None  # one token (a decoding step), or a cache passed by position
        names = self.bypassed_transforms()
        if not names:
            return None
        self.warned_plain_forward = True
        warnings.warn(
            f"infertrix: {' and '.join(names)} {'acts' if len(names) == 1 else 'act'} only on the KV cache, and this forward of {seq.shape[1]} "
            "tokens has no cache: its logits are the unoptimized model's (log-likelihood harnesses such as "
            "lm-eval score this way). To score with the compressed cache use "
            "infertrix.eval.loglikelihood(model, tok, context, continuation), or run the harness inside "
            "`with infertrix.eval.compressed_scoring(model):` (docs/evaluation.md). Warned once per model.",
            UserWarning,
            stacklevel=2,
        )
        return None

    @staticmethod
    def _layer_of(module, kwargs):
        cache = cache_argument(kwargs)
        if not isinstance(cache, PolicyCache) or not stores_kv(module):
            return None, None
        layer = cache.layers[module.layer_idx]
        return (cache, layer) if isinstance(layer, EvictingLayer) else (None, None)

    def _pre_hook(self, module, args, kwargs):
        cache, layer = self._layer_of(module, kwargs)
        if layer is None:
            return None
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n = hidden.shape[1] if hidden is not None else 0
        # one decoding step over KIVI codes: KIVI's attention function reads them in place
        state = cache.states[cache.rank[module.layer_idx]]
        state.attend_codes = (
            n == 1
            and layer.n_quantized > 0
            and getattr(getattr(module, "config", None), "_attn_implementation", None)
            == KIVI_ATTENTION
        )
        if state.attend_codes:
            kwargs["kivi_layer"] = layer
        if isinstance(mask, Tensor) and mask.dim() == 4 and hidden is not None:
            want = layer.stored_length + n
            if mask.shape[-1] > want:  # this layer holds fewer tokens than the longest: its suffix
                kwargs["attention_mask"] = mask[..., -want:]
        self.row_masks.pop(module.layer_idx, None)
        hidden_slots = hidden_slots_of(layer, state.aux.get(HIDDEN))
        if hidden_slots is not None and hidden is not None:  # fillers, head budgets: one mask per KV head
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, Tensor) and mask.dim() == 4 else None
            self.row_masks[module.layer_idx] = mask  # the policy tells pads from tokens by it
            groups = getattr(module, "num_key_value_groups", 1)
            kwargs["attention_mask"] = hide_slots(mask, hidden_slots, n, layer.stored_length + n, groups, hidden.dtype)
        return args, kwargs

    def _forward_hook(self, model, args, kwargs, output):
        """After the model's whole forward on a PolicyCache: the policy's ``after_forward`` (KVzip)."""
        cache = cache_argument(kwargs)
        if not isinstance(cache, PolicyCache):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        acted = cache.after_forward(model, ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        cache.forward_new = None  # known only during a causal LM forward (a later direct decoder call: unknown)
        if acted:
            self.last_stats = cache_stats(cache)  # describe() reports the cache as compressed
        return None

    def _post_hook(self, module, args, kwargs, output):
        cache, layer = self._layer_of(module, kwargs)
        if layer is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = self.row_masks.pop(module.layer_idx, kwargs.get("attention_mask"))  # not the one per head
        cache.after_attention(module, module.layer_idx, hidden, kwargs.get("position_embeddings"), mask)
        if module.layer_idx == cache.evicting_indices[-1]:
            self.last_stats = cache_stats(cache)  # describe() reports the last forward's cache
        return None

    # -- describe ------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return (
            dict(self.last_stats)
            if self.last_stats
            else {"kv_cache": "no cache used yet (run generate)"}
        )


def cache_stats(cache: PolicyCache) -> dict[str, Any]:
    """KV bytes now vs. a plain DynamicCache holding the same tokens, and tokens seen/stored."""
    full, now = cache.full_kv_bytes(), cache.kv_bytes()
    stored = cache.stored_lengths()
    out: dict[str, Any] = {
        "kv_bytes": now,
        "kv_bytes_uncompressed": full,
        "kv_fraction": round(now / full, 4) if full else 1.0,
        "tokens_seen": cache.evicting_layers[0].cumulative_length,
        "tokens_stored": stored[0]
        if len(set(stored)) == 1
        else f"{min(stored)}..{max(stored)} (per layer)",
    }
    fillers = sum(layer.fillers for layer in cache.evicting_layers)
    if fillers:
        rows = sum(layer.keys.shape[0] * layer.stored_length for layer in cache.evicting_layers if layer.is_initialized)
        out["filler_slots"] = (f"{fillers} of {rows} stored row slots (a batch's rows keep their own budgets, and a "
                               "layer stores its largest row's count: shorter rows' extra slots are hidden fillers)")
    out.update(cache.log.report())
    if cache.state_bytes():
        out["policy_state_bytes"] = cache.state_bytes()
    if cache.scratch_bytes():
        out["dequant_buffer_bytes"] = cache.scratch_bytes()  # shared by all layers (KIVI decoding)
    return out


def after_engine_forward(model: nn.Module, cache: PolicyCache, n: int, observed: dict | None = None,
                         pads: Tensor | None = None, done: set[int] | None = None) -> None:
    """What the attention hooks do after a forward the decode engine ran on ``cache`` (``n`` new
    tokens; the hooks were not called): the policy's bookkeeping, observation and due compressions
    from the engine's attention (``observed``, see ``PolicyCache.engine_observes``; ``pads`` [B]
    each row's left padding), KIVI's flush, describe's stats; layers in ``done`` were handled as
    they ran (:func:`engine_layer_hook`)."""
    todo = [i for i in cache.evicting_indices if done is None or i not in done]
    active = todo and cache.policy is not None and not cache.policy.is_noop
    modules = _attention_modules(model) if active else None
    for i in todo:
        cache.after_engine_layer(i, n, modules, observed, pads)
    setup = kv_setup(model)
    if setup is not None:
        setup.last_stats = cache_stats(cache)


def engine_layer_hook(model: nn.Module, cache: PolicyCache, n: int, observed: dict | None, pads: Tensor | None,
                      done: set[int]):
    """The engine's callback after each layer it ran on ``cache``: the hooks' work for that layer (a prompt
    chunk compresses layer by layer, as on the module path); ``done`` collects the layers handled."""
    modules = _attention_modules(model) if cache.policy is not None and not cache.policy.is_noop else None

    def after_layer(i: int) -> None:
        if i in cache.rank:
            cache.after_engine_layer(i, n, modules, observed, pads)
            done.add(i)

    return after_layer


def kv_setup(model: nn.Module, create: bool = False) -> KVCacheSetup | None:
    """The model's KV-cache setup: its slot of the run-time record (:mod:`infertrix.core.state`)."""
    return family_state(model, "kvcache", (lambda: KVCacheSetup(model)) if create else None)


def new_cache(model: nn.Module) -> PolicyCache:
    """A fresh cache following the KV-cache transforms applied to ``model`` (for manual forward loops,
    chunked prefill, or to reuse one cache across several ``generate`` calls)."""
    setup = kv_setup(model)
    if setup is None:
        raise UnsupportedModelError(
            "no infertrix.kvcache transform is applied to this model; call "
            "infertrix.optimize(model, 'snapkv:0.5') (or another kvcache transform) first"
        )
    return setup.new_cache()
