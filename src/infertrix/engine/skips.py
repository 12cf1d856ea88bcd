"""Skip plans on the engine: which decoder layers and sublayers a forward runs, and the half layers.

What is skipped is read from the model's skip state (:class:`infertrix.skip.SkipState`): the
handles of the plans applied now (a strategy's plan, ``plan.active``, AdaSkip's per-prompt plan)
and SkipDecode's schedule, never guessed from module types. The engine's plan is built from the
layers as they are *without* those plans (the modules the handles swapped out, SkipDecode's
wrapped layers), so toggling a plan (self-speculation drafts) does not rebuild it; each forward
then runs each layer whole, attention only, MLP only, or not at all.

A skipped sublayer adds nothing to the residual stream, as its pass-through module does on the
module path (``skip/modules.py``), and a skipped attention writes no KV for its layer (its cache
entry keeps what it held), as there. The half layers run the engine's ops one by one, each
row-invariant, so a token's logits stay the same bits in a step, a window, a batch row and at
any thread count.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..core.model import decoder_layers
from ..ops.engine import _attention_out, _mlp_out, _queries_keys_values
from ..skip.state import skip_state

_ops = torch.ops.infertrix
FULL, ATTN, MLP, NONE = "full", "attention only", "mlp only", "skipped"
_MODE = {"layer": NONE, "attention": MLP, "mlp": ATTN}  # a plan entry -> what still runs
Mode = str | Tensor  # a Tensor [T]: SkipDecode's columns that skip the layer (it runs for the others)


def layer_views(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None, nn.Module | None]]:
    """Each decoder layer as it is without the skip plans applied now: (layer, self_attn, mlp), with
    the modules the plans' handles swapped out put back and SkipDecode's wrappers unwrapped."""
    layers = list(decoder_layers(model))
    subs: dict[tuple[int, str], nn.Module] = {}
    st = skip_state(model)
    if st is not None:
        for handle in reversed(st.handles):  # as undo would: newest first, so the oldest original wins
            for parent, attr, original in reversed(handle.swaps):
                if isinstance(parent, nn.ModuleList):
                    layers[int(attr)] = original
                else:
                    subs[(id(parent), attr)] = original
        for i, (wrapper, inner, _) in st.schedule.items():
            if layers[i] is wrapper:
                layers[i] = inner
    return [(ly, subs.get((id(ly), "self_attn"), getattr(ly, "self_attn", None)),
             subs.get((id(ly), "mlp"), getattr(ly, "mlp", None))) for ly in layers]


def view_fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Identities of the modules of the model without its skip plans (see :func:`layer_views`):
    the same while a plan is toggled, different when a module is swapped otherwise."""
    ids = {id(m) for m in model.modules()}
    st = skip_state(model)
    if st is None or not (st.handles or st.schedule):
        return tuple(sorted(ids))
    stubs, originals = set(), set()
    for handle in st.handles:
        for parent, attr, original in handle.swaps:
            stub = parent[int(attr)] if isinstance(parent, nn.ModuleList) else getattr(parent, attr)
            stubs |= {id(m) for m in stub.modules()}
            originals |= {id(m) for m in original.modules()}
    wrappers = {id(w) for w, _, _ in st.schedule.values()}
    return tuple(sorted(((ids - stubs) | originals) - wrappers))


def skipped_units(model: nn.Module, extra=None) -> dict[int, str]:
    """Layer index -> what runs of it (ATTN, MLP or NONE) under the plans applied now and ``extra``
    (a :class:`~infertrix.skip.SkipPlan`, a self-speculation draft's); layers that run whole are absent."""
    st = skip_state(model)
    entries = [e for h in (st.handles if st is not None else ()) for e in h.plan]
    entries += list(extra) if extra is not None else []
    out: dict[int, str] = {}
    for e in entries:
        mode = _MODE[e.sublayer]
        prev = out.get(e.layer)
        out[e.layer] = mode if prev in (None, mode) else NONE  # attention and MLP both skipped: nothing runs
    return out


def schedule(model: nn.Module) -> dict[int, int]:
    """SkipDecode's layers: index -> first skipped position."""
    st = skip_state(model)
    return {i: t for i, (_, _, t) in st.schedule.items()} if st is not None else {}


def layer_modes(model: nn.Module, n: int, positions: Tensor, extra=None) -> list[Mode] | None:
    """What each of the ``n`` layers runs in a forward at rotary ``positions`` [B, T] (None: all of
    every layer). SkipDecode decides per column from the largest position over the rows, as its
    :class:`~infertrix.skip.ScheduledLayer` does: a column at or past the layer's threshold skips it."""
    units, sched = skipped_units(model, extra), schedule(model)
    if not units and not sched:
        return None
    modes: list[Mode] = [units.get(i, FULL) for i in range(n)]
    if sched:
        col = positions.amax(0)
        for i, first in sched.items():
            if modes[i] == NONE:
                continue
            if int(col.min()) >= first:
                modes[i] = NONE
            elif int(col.max()) >= first:
                modes[i] = col >= first
    return modes


def chain(layers: list, final: tuple[Tensor, float], modes: list[Mode]) -> list:
    """The layer plans with each one's next norm the input norm of the next layer that runs (its
    residual add is fused with that norm), the final norm after the last."""
    out = []
    for i, lp in enumerate(layers):
        j = next((k for k in range(i + 1, len(layers)) if not is_mode(modes[k], NONE)), None)
        if j == i + 1:
            out.append(lp)
            continue
        w, eps = (layers[j].in_norm, layers[j].in_eps) if j is not None else final
        out.append(replace(lp, tensors=[lp.tensors[0], w, *lp.tensors[2:]], floats=[*lp.floats[:2], eps, *lp.floats[3:]]))
    return out


def is_mode(mode: Mode, name: str) -> bool:
    return isinstance(mode, str) and mode == name


def mlp_only(h: Tensor, lp) -> tuple[Tensor, Tensor]:
    """A layer whose attention is skipped: h + mlp(mid_norm(h)) (Gemma 3: its output norm), and the
    next norm of that."""
    t, ints, f = lp.tensors, lp.ints, lp.floats
    return _mlp_out(h, _ops.rms_norm(h, t[0], f[1]), t, ints, f)


def attention_only(h: Tensor, a: Tensor, lp, kbuf: Tensor, vbuf: Tensor, cos: Tensor, sin: Tensor,
                   positions: Tensor, start: Tensor, index: int, batch: int, tree: Tensor | None = None,
                   norm: tuple[Tensor, float] | None = None, probs: Tensor | None = None,
                   queries: Tensor | None = None, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A layer whose MLP is skipped: h + attention(a) over the cache (new keys and values written
    at ``index``; Gemma 3: its output norm), and the next norm of that (``norm``: another one, as
    (weight, eps); an MoE layer's post-attention norm). ``tree`` / ``probs`` / ``queries`` /
    ``hidden``: ``engine_layer``'s."""
    t, ints, f = lp.tensors, lp.ints, lp.floats
    heads, d = ints[0], ints[2]
    q, k, v = _queries_keys_values(a, t, ints, f, cos, sin, positions, batch)
    _ops.kv_append(kbuf, vbuf, k.contiguous(), v.contiguous(), index)
    if queries is not None:
        queries.copy_(q)
    o = _ops.gqa_attention(q.contiguous(), kbuf, vbuf, start, index, f[0], ints[5], probs, tree, hidden)
    return _attention_out(h, o.reshape(a.shape[0], heads * d), t, ints, f, norm if norm is not None else (t[1], f[2]))
