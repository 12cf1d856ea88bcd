"""The engine's forward: a whole decoder stack as a short loop over the engine's ops.

One ``infertrix::engine_layer`` call per dense decoder layer (C++: the q/k/v projection, fused into
one call on quantized models, optional per-head q/k norms, rotary embedding from tables, the KV
append, grouped-query attention over the cache, o_proj, the residual add fused with the next
norm, the gate/up projection, the SiLU- or GELU-gated product and down_proj; Gemma 3's output
norms), then the LM head on the kept positions only: about 35 dispatches per token on a 30-layer
model instead of transformers' thousands of small ops. An MoE layer runs its attention half as the
engine's ops one by one and its MoE block on row-invariant kernels or as the model's module (``moe.py``).

Every step is row-invariant (``ops/engine.py``, ``linears.py``), so a token's logits are the same
bits in a 1-token step, inside a window of tokens, as a row of a left-padded batch, in the prompt,
and at any thread count.

Skip plans (``skips.py``): the plan packs every layer as it is without them, and each forward skips
what the model's skip state (and a self-speculation draft's plan) skips: a whole layer costs
nothing, a layer with one sublayer skipped runs the other's ops one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.model import text_config
from . import linears
from .cache import EngineCache, begin, commit
from .kivi import kivi_step, reads_codes
from .moe import moe_hooks, moe_layer, moe_mlp_only
from .plan import _norm, fingerprint, layer_plan
from .skips import (
    ATTN,
    FULL,
    MLP,
    NONE,
    attention_only,
    chain,
    is_mode,
    layer_modes,
    layer_views,
    mlp_only,
)

_ops = torch.ops.infertrix
TABLE_BLOCK = 256  # rotary table positions computed per call (fixed, so a position's values never change)


class Runner:
    """The plan of one model and its forward (built once, rebuilt when a module is swapped)."""

    def __init__(self, model: nn.Module):
        cfg = text_config(model)
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        views = layer_views(model)
        self.final = _norm(inner.norm)
        nexts = [_norm(layer.input_layernorm) for layer, _, _ in views[1:]] + [self.final]
        self.layers = [layer_plan(model, layer, attn, mlp, nxt)
                       for (layer, attn, mlp), nxt in zip(views, nexts, strict=True)]
        head = model.get_output_embeddings()
        # quantized projections: the module path's prefill rounds differently per batch, and the
        # different int8 codes change tokens, so a KV policy's prefill runs here (PolicyCache.engine_refusal)
        self.quantized = any(linears.kind(m) not in (None, "fp32") for _, attn, mlp in views
                             for mod in (attn, mlp) if mod is not None for m in mod.children())
        self.moe = sum(lp.mlp is not None for lp in self.layers)  # MoE layers (their blocks: moe.py)
        # the hook dicts the engine calls itself (an MoE layer's decoder layer and post-attention norm)
        self.hook_dicts = frozenset(id(d) for lp in self.layers if lp.mlp is not None
                                    for d in (lp.layer_module._forward_hooks, lp.mid_module._forward_pre_hooks))
        self.head = linears.linear(head)
        self.greedy_head = linears.argmax(head)
        self.vocab = head.out_features
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # rotary tables per LayerPlan.rope key (Gemma 3: one per layer type, local and global bases)
        self.rope_keys = sorted({lp.rope for lp in self.layers}, key=str)
        self.cos: dict[str | None, list[Tensor]] = {key: [] for key in self.rope_keys}
        self.sin: dict[str | None, list[Tensor]] = {key: [] for key in self.rope_keys}
        self.tables: dict[str | None, tuple[Tensor, Tensor]] = {}
        self.fingerprint = fingerprint(model)
        self.chains: dict[tuple[bool, ...], list] = {}  # layer plans per set of skipped layers

    def _chain(self, modes: list) -> list:
        key = tuple(is_mode(m, NONE) for m in modes)
        if key not in self.chains:
            self.chains[key] = chain(self.layers, self.final, modes)
        return self.chains[key]

    def _tables(self, need: int, like: Tensor) -> None:
        """cos/sin for positions [0, need), by the model's own rotary module, TABLE_BLOCK at a time
        (one pair of tables per ``rope_keys`` entry, all the same length)."""
        have = len(self.cos[self.rope_keys[0]]) * TABLE_BLOCK
        if have >= need:
            return
        while have < need:
            ids = torch.arange(have, have + TABLE_BLOCK, device=like.device)[None]
            for key in self.rope_keys:
                cos, sin = self.rotary(like, ids) if key is None else self.rotary(like, ids, key)
                self.cos[key].append(cos[0].float())
                self.sin[key].append(sin[0].float())
            have += TABLE_BLOCK
        self.tables = {key: (torch.cat(self.cos[key]).contiguous(), torch.cat(self.sin[key]).contiguous())
                       for key in self.rope_keys}

    def _whole_layers(self, h: Tensor, a: Tensor, cache: EngineCache, positions: Tensor, pads: Tensor, b: int,
                      t: int, tree: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`forward`'s layer loop when every layer runs whole on an ``EngineCache`` and nothing
        is observed: ``begin`` / ``commit`` inlined (a decode step's Python between the ops is most
        of what runs outside the kernels)."""
        kv, d, tables, layer = self.kv_heads, self.head_dim, self.tables, _ops.engine_layer
        extra = {} if tree is None else {"tree": tree}
        for store, lp in zip(cache.layers, self.layers, strict=True):
            index = store.length
            store.reserve(h, b, kv, index + t, d)
            cos, sin = tables[lp.rope]
            h, a = layer(h, a, lp.tensors, lp.ints, lp.floats, store.kbuf, store.vbuf, cos, sin, positions, pads, index,
                         b, **extra)
            store.length = index + t
        return h, a

    @torch.no_grad()
    def forward(self, ids: Tensor, pads: Tensor, positions: Tensor, cache, keep: int | Tensor, skip=None,
                observe: dict[int, tuple[Tensor, Tensor] | None] | None = None, greedy: bool = False,
                after_layer=None, tree: Tensor | None = None, hidden: dict[int, Tensor] | None = None) -> Tensor:
        """Logits [B, kept, V] for tokens ``ids`` [B, T] appended to ``cache`` (an ``EngineCache`` or
        a storage ``cache.storage_problem`` accepts); row b has ``pads[b]`` left-padding tokens, its
        tokens sit at rotary ``positions`` [B, T]. The skip plans applied to the model now are
        followed, and ``skip`` (a ``SkipPlan``: a self-speculation draft's) on top of them.
        ``observe``: layer indices whose attention a KV policy scores with; each entry receives
        (probabilities [B, H, T, slots], post-rotary queries [B, T, H, D]) from ``engine_layer``, or, where
        its value is an int k, (None, the last k queries; k < 0: all) (a prefill chunk's policy recomputes
        the attention it needs from them)
        (layers run whole: the engine takes no skip plan with a policy's cache). ``greedy``: one-hot
        logits (1 at each position's greedy token, 0 elsewhere) from the head's fused argmax, for
        callers that only take the argmax (``transform.greedy_only``). ``after_layer(i)``: called once
        layer ``i`` has run and committed its tokens (a KV policy compresses it there). ``tree``
        (int64 [B, T]): the new tokens form a token tree, each slot's parent slot (-1: none), for
        verifying draft trees (``gqa_attention``'s; not with ``observe`` or KIVI codes). ``hidden``:
        by layer index, the stored slots each KV head does not attend (``PolicyCache.engine_hidden``)."""
        b, t = ids.shape
        x = self.embed(ids).reshape(b * t, -1)
        self._tables(int(positions.max()) + 1, x)
        modes = layer_modes(self.model, len(self.layers), positions, skip)
        plans = self.layers if modes is None else self._chain(modes)
        modes = modes or [FULL] * len(plans)
        first = next((lp for lp, m in zip(plans, modes, strict=True) if not is_mode(m, NONE)), None)
        a = _ops.rms_norm(x, *((first.in_norm, first.in_eps) if first is not None else self.final))
        h = x
        if tree is not None and observe is not None:
            raise ValueError("the engine verifies no token tree in a forward whose attention a KV policy reads")
        if (type(cache) is EngineCache and plans is self.layers and observe is None and after_layer is None and not hidden
                and not self.moe):
            h, a = self._whole_layers(h, a, cache, positions, pads, b, t, tree)
        else:
            h, a = self._layers(h, a, x, cache, plans, modes, positions, pads, b, t, observe, after_layer, tree, hidden)
        return self._head(a, b, t, keep, greedy)

    def _layers(self, h: Tensor, a: Tensor, x: Tensor, cache, plans: list, modes: list, positions: Tensor, pads: Tensor,
                b: int, t: int, observe, after_layer, tree: Tensor | None,
                hidden: dict[int, Tensor] | None) -> tuple[Tensor, Tensor]:
        """:meth:`forward`'s layer loop in general (skip modes, KIVI codes, observed attention, a
        policy's per-layer hook, masks per KV head)."""
        kv, d = self.kv_heads, self.head_dim
        for i, (store, lp, mode) in enumerate(zip(cache.layers, plans, modes, strict=True)):
            if is_mode(mode, NONE):
                continue
            if is_mode(mode, MLP):  # attention skipped: no KV written for this layer
                h, a = mlp_only(h, lp) if lp.mlp is None else moe_mlp_only(h, lp, b)
                continue
            cos, sin = self.tables[lp.rope]
            if reads_codes(store):  # KIVI codes: one token per row (cache.storage_problem), whole layers
                if tree is not None or (hidden is not None and i in hidden):
                    raise ValueError("the engine's KIVI step takes no token tree and no mask per KV head")
                h, a = kivi_step(h, a, lp, store, cos, sin, positions, pads, b)
                continue
            kbuf, vbuf, index, start = begin(store, x, b, kv, t, d, pads)
            if is_mode(mode, ATTN):
                h, a = attention_only(h, a, lp, kbuf, vbuf, cos, sin, positions, start, index, b, tree,
                                      hidden=None if hidden is None else hidden.get(i))
                if lp.mlp is not None:  # the module path still runs the layer (its MoE block a pass-through)
                    moe_hooks(h, lp, b)
            else:
                seen, last = (), None
                if observe is not None and i in observe:
                    last = observe[i]  # None: probabilities and queries; k: the last k queries only (-1: all)
                    probs = x.new_empty(b, self.heads, t, index + t) if last is None else None
                    seen = (probs, x.new_empty(b, t, self.heads, d))
                mask = None if hidden is None else hidden.get(i)
                if lp.mlp is not None:
                    out, a_out = moe_layer(h, a, lp, kbuf, vbuf, cos, sin, positions, start, index, b, *seen,
                                           tree=tree, hidden=mask)
                else:
                    out, a_out = _ops.engine_layer(h, a, lp.tensors, lp.ints, lp.floats, kbuf, vbuf, cos, sin,
                                                   positions, start, index, b, *seen, tree=tree, hidden=mask)
                if seen:
                    observe[i] = seen if last is None or last < 0 else (None, seen[1][:, -last:].clone())
                if isinstance(mode, Tensor):  # SkipDecode: these columns keep their input (KV still written)
                    cols = mode.repeat(b)[:, None]
                    a = torch.where(cols, _ops.rms_norm(h, lp.tensors[1], lp.floats[2]), a_out)
                    out = torch.where(cols, h, out)
                else:
                    a = a_out
                h = out
            commit(store, t)
            if after_layer is not None:
                after_layer(i)
        return h, a

    def _head(self, a: Tensor, b: int, t: int, keep: int | Tensor, greedy: bool) -> Tensor:
        a = a.view(b, t, -1)
        if isinstance(keep, Tensor):
            a = a[:, keep]
        elif keep:
            a = a[:, -keep:]
        kept = a.shape[1]
        if greedy:
            tokens = self.greedy_head(a.reshape(b * kept, -1)).view(b, kept, 1)
            return torch.zeros(b, kept, self.vocab, dtype=a.dtype, device=a.device).scatter_(-1, tokens, 1.0)
        return self.head(a.reshape(b * kept, -1)).view(b, kept, -1)
