"""``engine``: run ``generate`` (and any forward given an :class:`EngineCache`) through the decode
engine on supported models, the module path otherwise, and say which ran and why.

Applying it wraps the model instance's ``forward`` (never its class) and adds a ``generate``
hook that passes a fresh :class:`EngineCache` when the caller passes no cache (a KV-cache
transform's own cache comes first: the engine runs on ``GrowingCache`` and the policies'
``PolicyCache`` too, see ``cache.py``). Each forward then takes the engine when everything it is
asked for is supported, else the model's own forward with the same cache; ``describe`` reports the
counts of each path and every reason a forward fell back.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..core import Applied, Stage, Transform, register_transform
from ..core.generation import (
    CACHE_KWARGS,
    add_generate_hook,
    cache_argument,
    cache_argument_name,
    left_padding_start,
    tree_mask_layout,
)
from ..kvcache.attach import after_engine_forward, engine_layer_hook
from ..kvcache.policy_cache import PolicyCache
from ..ops.engine import LAYER_INTS, LINEAR_KINDS
from ..skip.state import skip_state
from .cache import EngineCache, storage_problem
from .kivi import reads_codes
from .moe import known_hooks, moe_report
from .plan import fingerprint, why_unsupported
from .runner import Runner
from .skips import skipped_units

_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_HANDLED = {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "use_cache", "return_dict",
            "cache_position", "output_attentions", "output_hidden_states", *CACHE_KWARGS}


def _foreign(hooks: dict, known: object, engine_calls: frozenset[int]) -> bool:
    # transformers installs output-capturing hooks once outputs are requested; they record only
    # while a forward asks for attentions / hidden states, which takes the module path anyway.
    # infertrix.kvcache's attention hooks act on a PolicyCache only, and the engine does their work
    # (after_engine_forward) on the forwards it runs. AdaSkip's controller (``known``) acts on
    # prompts only, which take the module path (EngineRuntime.why_module). Hooks marked for the
    # engine (moe.known_hooks) in a hook dict it calls itself (``engine_calls``: an MoE layer's)
    # run on the engine too.
    calls = id(hooks) in engine_calls
    return any(not getattr(fn, "__module__", "").startswith(("transformers.", "infertrix.kvcache."))
               and not (calls and known_hooks(fn))
               and (known is None or getattr(fn, "__self__", None) is not known) for fn in hooks.values())


def user_hooks(model: nn.Module, engine_calls: frozenset[int] = frozenset()) -> str | None:
    """The first module with forward hooks (the engine would not call them), or None;
    ``engine_calls``: ids of the hook dicts the engine calls itself (``Runner.hook_dicts``)."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    st = skip_state(model)
    known = st.controller if st is not None else None
    for name, mod in model.named_modules():
        if mod is not model and (_foreign(mod._forward_hooks, known, engine_calls)
                                 or _foreign(mod._forward_pre_hooks, known, engine_calls)):
            return f"forward hooks on {name}"
    return None


def skip_problem(model: nn.Module, cache, ids: Tensor) -> str | None:
    """Why this forward takes the module path because of the skip family, or None."""
    st = skip_state(model)
    if st is None or not (st.handles or st.schedule or st.controller):
        return None
    if st.controller is not None and cache.get_seq_length() == 0:
        return "AdaSkip measures the prompt's sublayers (its hooks run on the module path)"
    if not (skipped_units(model) or st.schedule):
        return None
    if isinstance(cache, PolicyCache):
        return "a skip plan with a KV-cache policy's cache (the policy counts every layer's tokens)"
    if kivi_codes(cache):
        return "a skip plan with KIVI codes (the engine's KIVI step runs whole layers)"
    return None


def kivi_codes(cache) -> bool:
    return any(reads_codes(layer) for layer in getattr(cache, "layers", ()))


# generate's own parameters (the rest of its keyword arguments are generation settings or model inputs)
_GENERATE_PARAMS = ("generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                    "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                    "negative_prompt_attention_mask", "custom_generate")


def greedy_only(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether this ``generate`` call only ever takes the argmax of each step's logits: greedy
    search (transformers' ``_sample`` loop, one beam, no assistant, no custom decoding loop), no
    scores, logits or cache returned, and no logits processor: the list transformers itself builds
    from the merged settings must be empty (a repetition penalty, bad words, a caller's processor...),
    and ``min_length`` / ``min_new_tokens`` (whose processors depend on an EOS token) must be unset.
    Anything unexpected (a transformers that changed these private helpers) answers False."""
    from transformers.generation.configuration_utils import GenerationMode

    if len(args) > 1 or any(kwargs.get(k) is not None for k in ("assistant_model", "custom_generate",
                                                                  "prefix_allowed_tokens_fn", "negative_prompt_ids")):
        return False
    try:
        settings = {k: v for k, v in kwargs.items() if k not in _GENERATE_PARAMS}
        cfg, _ = model._prepare_generation_config(kwargs.get("generation_config"), **settings)
        if cfg.get_generation_mode(None) != GenerationMode.GREEDY_SEARCH:
            return False
        if cfg.output_scores or cfg.output_logits or cfg.return_dict_in_generate or cfg.min_new_tokens or cfg.min_length:
            return False
        processors = model._get_logits_processor(generation_config=cfg, input_ids_seq_length=1,
                                                 logits_processor=kwargs.get("logits_processor"), device="cpu",
                                                 model_kwargs={})
    except Exception:  # noqa: BLE001 - any surprise means "not provably greedy-only"
        return False
    return len(processors) == 0


class EngineRuntime:
    """The engine's state on one model: its runner, and which path each forward took."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.runner: Runner | None = None
        self.unsupported: str | None = None
        self.hooks: str | None = None
        self.checked: tuple[int, ...] | None = None
        self.counts: Counter[str] = Counter()
        self.greedy_forwards = 0
        self.last = "none yet"

    def _check_model(self) -> str | None:
        """Why the model cannot take the engine now (re-checked when its modules change)."""
        fp = fingerprint(self.model)
        if fp != self.checked:
            self.checked = fp
            self.unsupported = why_unsupported(self.model)
            self.runner = None
            if self.unsupported is None:
                self.runner = Runner(self.model)
                self.checked = fingerprint(self.model)
        self.hooks = user_hooks(self.model, self.runner.hook_dicts if self.runner is not None else frozenset())
        return self.unsupported or self.hooks

    def supported(self) -> bool:
        return self._check_model() is None

    def why_module(self, kwargs: dict[str, Any]) -> str | None:
        cache = cache_argument(kwargs)
        cfg = self.model.config
        if cache is None:
            return self.unsupported or "no cache passed (generate passes an EngineCache)"
        if not isinstance(cache, EngineCache) and (why := storage_problem(cache)):
            return self.unsupported or why
        if kwargs.get("use_cache") is False:
            return "use_cache=False"
        if kwargs.get("input_ids") is None:
            return "no input_ids (inputs_embeds)"
        if kwargs.get("output_attentions", getattr(cfg, "output_attentions", False)):
            return "output_attentions requested"
        if kwargs.get("output_hidden_states", getattr(cfg, "output_hidden_states", False)):
            return "output_hidden_states requested"
        if kwargs.get("output_router_logits", getattr(cfg, "output_router_logits", False)):
            return "output_router_logits requested (MoE routers' logits: the engine returns none)"
        if kwargs.get("return_dict") is False:
            return "return_dict=False"
        extra = sorted(k for k, v in kwargs.items() if k not in _HANDLED and v is not None)
        if extra:
            return f"arguments {extra}"
        if self.model.training:
            return "training mode"
        if torch.is_grad_enabled():
            return "autograd is on (the engine's ops have no backward; run under torch.no_grad)"
        if cache.get_seq_length() == 0 or self.runner is None:
            why = self._check_model()
            if why:
                return why
        elif self.hooks:
            return self.hooks
        ids = kwargs["input_ids"]
        if ids.dim() != 2 or ids.shape[1] == 0:
            return f"input_ids of shape {tuple(ids.shape)}"
        if why := storage_problem(cache, ids.shape[0], ids.shape[1]):
            return why
        if self.runner is not None and any(lp.ints[6] for lp in self.runner.layers) and kivi_codes(cache):
            return "KIVI codes on a Gemma 3 model (the engine's KIVI step runs Llama-style layers only)"
        if why := skip_problem(self.model, cache, ids):
            return why
        if isinstance(cache, PolicyCache):
            return cache.engine_refusal(ids.shape[1], prefill=self.runner is not None and self.runner.quantized)
        return None

    def forward(self, inner, args: tuple, kwargs: dict[str, Any]):
        if args:
            if len(args) == 1 and "input_ids" not in kwargs:
                kwargs = {**kwargs, "input_ids": args[0]}
            else:
                return self._module("positional arguments", inner, args, kwargs)
        why = self.why_module(kwargs)
        if why is not None:
            return self._module(why, inner, (), kwargs)
        ids = kwargs["input_ids"]
        cache = cache_argument(kwargs)
        b, t = ids.shape
        index = cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        tree = None
        if mask is None:
            start = torch.zeros(b, dtype=torch.long, device=ids.device)
        elif mask.dim() == 4:  # a token tree's verification (speculative/tree.py)
            layout = tree_mask_layout(mask, index, t)
            if layout is None:
                return self._module("a 4-D attention mask that is not a token tree over left padding", inner, (),
                                    kwargs)
            if isinstance(cache, PolicyCache):
                return self._module("a token tree over a KV policy's cache", inner, (), kwargs)
            start, tree = layout
        else:
            start = left_padding_start(mask, index + t)
            if start is None:
                return self._module("an attention mask that is not left padding", inner, (), kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(index, index + t, device=ids.device)[None] - start[:, None]).clamp_min(0)
        elif positions.shape != (b, t):
            if positions.dim() != 2 or positions.shape[1] != t or positions.shape[0] != 1:
                return self._module(f"position_ids of shape {tuple(positions.shape)}", inner, (), kwargs)
            positions = positions.expand(b, t)
        observe = cache.engine_observes(t, prefill=self.runner.quantized) if isinstance(cache, PolicyCache) else None
        keep = kwargs.get("logits_to_keep", 0)
        # generate marked the cache (greedy_only): its loop takes only the last position's argmax
        greedy = getattr(cache, "greedy_head", False) and isinstance(keep, int) and keep == 1
        done: set[int] = set()
        after_layer = engine_layer_hook(self.model, cache, t, observe, start, done) if isinstance(cache, PolicyCache) else None
        logits = self.runner.forward(ids, start, positions.contiguous(), cache, keep, observe=observe, greedy=greedy,
                                     after_layer=after_layer, tree=tree,
                                     hidden=cache.engine_hidden() if isinstance(cache, PolicyCache) else None)
        self.greedy_forwards += greedy
        if isinstance(cache, PolicyCache):
            after_engine_forward(self.model, cache, t, observe, start, done)
        self.counts["engine"] += 1
        self.last = "engine"
        return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE: cache})

    def _module(self, why: str, inner, args: tuple, kwargs: dict[str, Any]):
        self.counts[f"module: {why}"] += 1
        self.last = f"module ({why})"
        return inner(*args, **kwargs)

    def report(self) -> dict[str, Any]:
        engine = self.counts.get("engine", 0)
        return {
            "model": "supported" if self.supported() else f"module path only: {self.unsupported or self.hooks}",
            "last_forward": self.last,
            "engine_forwards": engine,
            "module_forwards": sum(self.counts.values()) - engine,
            "greedy_head_forwards": self.greedy_forwards,
            "fallbacks": {k.removeprefix("module: "): v for k, v in self.counts.items() if k != "engine"},
        } | ({"skips": skips} if (skips := skipped_units(self.model)) else {}) | self._unfused() | self._moe()

    def _moe(self) -> dict[str, str]:
        return moe_report(self.runner.layers) if self.runner is not None and self.runner.moe else {}

    def _unfused(self) -> dict[str, str]:
        """Quantized q/k/v or gate/up groups that run as separate calls (the same bits, more calls):
        said, so a slower decode is not a mystery."""
        if self.runner is None:
            return {}
        groups = []  # slots of each quantized group (the first slot's kind tells float32 apart, never fused)
        for lp in self.runner.layers:
            n_qkv, n_gu = lp.ints[3:5]
            for first, n in ((0, n_qkv), (n_qkv + 1, n_gu)):
                if n and lp.ints[LAYER_INTS + 3 * first] != LINEAR_KINDS["fp32"]:
                    groups.append(n)
        apart = sum(n > 1 for n in groups)
        if not apart:
            return {}
        return {"unfused": f"{apart} of {len(groups)} quantized q/k/v and gate/up groups run as separate calls "
                           "(their kinds or settings differ, e.g. FlattenQuant calibrations or output counts off "
                           "the kernel's tiles)"}


@register_transform("engine")
@dataclass
class Engine(Transform):
    """The decode engine (``infertrix.engine``): ``generate`` runs a supported model's whole
    decoder stack as a few fused kernels per layer, with logits that do not depend on the batch,
    the window of tokens or the thread count (MoE models: their MoE blocks run as the model's
    modules, which do; ``moe.py``); anything unsupported runs the module path.

    On by default: ``optimize`` adds it to every model that generates (``default_on``), unless the
    compiled extension is missing or the model is sharded by tensor parallelism (``describe`` then
    says why it was not added); on a model it does not support it runs the module path and says so.

    - ``enabled``: false keeps the module path everywhere (the opt-out: ``engine(enabled=false)``).
    - ``greedy_head``: in a ``generate`` call that only takes each step's argmax (``greedy_only``:
      greedy search, no logits processor, no scores or logits returned), the LM head returns each
      row's greedy token, fused into the W4A8 kernel (no [batch, vocab] logits), as one-hot logits
      (the same tokens bit for bit); false always computes the logits.

    Lossless in the sense of the module path's arithmetic to float32 rounding (another summation
    order; quantized layers are the same kernels). No extra weight memory (fused projections view
    one buffer); the KV cache is preallocated with doubling.
    """

    use_when = ("llama / mistral / qwen2 / qwen3 / gemma3 text models in float32, W8A8 or W4A8: faster decoding, "
                "batch-invariant logits; Mixtral / Qwen2-MoE / Qwen3-MoE too")

    stage: ClassVar[Stage] = Stage.DECODING
    primary: ClassVar[str | None] = "enabled"
    default_on: ClassVar[bool] = True
    same_weights: ClassVar[bool] = True

    enabled: bool = True
    greedy_head: bool = True

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        if not self.enabled:
            return None
        return ("the engine runs each decoder layer as one fused op over whole weights and heads, with no "
                "all-reduce between ranks; use engine(enabled=false) or load the model without tp_plan")

    def default_problem(self, model: nn.Module) -> str | None:
        from ..core.parallel import tensor_parallel
        from ..ops import _extension

        if _extension.load() is None:
            return (f"the compiled extension is {_extension.load_error()} (the engine's PyTorch reference "
                    "is slower than the module path); add `engine` to run it anyway")
        if tensor_parallel(model) is not None:
            return "the model is sharded by tensor parallelism (the engine runs whole layers)"
        return None

    def apply(self, model: nn.Module) -> Applied:
        runtime = EngineRuntime(model)
        if not self.enabled:
            return Applied(self, undo=lambda: None, report=lambda: {"path": "module (engine disabled)"})
        had_own = "forward" in model.__dict__
        inner = model.__dict__["forward"] if had_own else type(model).forward.__get__(model)

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any):
            return runtime.forward(inner, args, kwargs)

        model.__dict__["forward"] = forward

        def hook(m: nn.Module, args: tuple, kwargs: dict[str, Any]):
            gen_cfg = kwargs.get("generation_config") or getattr(m, "generation_config", None)
            if (
                cache_argument(kwargs) is None
                and kwargs.get("use_cache", True) is not False
                and getattr(gen_cfg, "cache_implementation", None) is None
                and "cache_implementation" not in kwargs
                and runtime.supported()
            ):
                cache = kwargs[cache_argument_name(m)] = EngineCache(m.config)
                cache.greedy_head = self.greedy_head and greedy_only(m, args, kwargs)
            return args, kwargs

        remove = add_generate_hook(model, hook, order=99)  # last: a policy's own cache comes first

        def undo() -> None:
            remove()
            if had_own:
                model.__dict__["forward"] = inner
            else:
                model.__dict__.pop("forward", None)

        return Applied(self, undo=undo, report=runtime.report)


def engine_runtime(model: nn.Module) -> EngineRuntime | None:
    """The runtime the ``engine`` transform keeps on ``model`` (None when it is not applied)."""
    from ..core.state import state

    st = state(model)
    for a in st.applied if st else []:
        owner = getattr(a.report, "__self__", None)
        if isinstance(a.transform, Engine) and isinstance(owner, EngineRuntime):
            return owner
    return None
