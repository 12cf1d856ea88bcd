"""The attention math the KV policies score with: softmax attention of buffered queries over the
stored keys (causal by slot, pads masked), post-rotary queries recomputed from an attention
module's input, and SnapKV's pooling. On a forward the decode engine ran, the forward's own rows
come from the engine's probabilities instead (``ScoreContext.attention``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .policy_cache import HIDDEN

if TYPE_CHECKING:
    from .context import ScoreContext


def attention_probs(queries: Tensor, ctx: ScoreContext, logits_fn=None, end: int | None = None) -> Tensor:
    """See :meth:`ScoreContext.attention`; ``queries`` are the ``w`` tokens' queries in slots
    [end - w, end) (``end`` None: the last ``w`` slots)."""
    b, hq, w, d = queries.shape
    hkv, s = ctx.keys.shape[1], ctx.keys.shape[2]
    end = s if end is None else end
    g = hq // hkv
    # one [G*w, D] x [D, S] product per KV head: the keys are read once, never expanded per group
    q = queries.float().reshape(b, hkv, g * w, d)
    logits = torch.matmul(q, ctx.keys.float().transpose(-1, -2)).view(b, hkv, g, w, s)
    logits = logits * ctx.scaling  # [B,Hkv,G,w,S]
    if logits_fn is not None:
        logits = logits_fn(logits)
    blocked = None
    if w > 1 or end < s:  # causal by slot: the queries' keys are slots [end - w, end)
        slot = torch.arange(s, device=q.device)
        qpos = torch.arange(end - w, end, device=q.device)
        blocked = slot[None, :] > qpos[:, None]  # [w, S]
    if ctx.visible is not None:
        pads = ~ctx.visible[:, None, :]  # [B, 1, S]
        blocked = (pads if blocked is None else blocked[None] | pads)[:, None, None]
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    hidden = ctx.state.aux.get(HIDDEN) if ctx.cache is not None else None
    if hidden is not None:  # slots a KV head no longer attends (AdaKV's head budgets): evicted for it
        h = min(s, hidden.shape[-1])
        hide = torch.zeros(b, hkv, s, dtype=torch.bool, device=q.device)
        hide[..., :h] = hidden[..., :h]
        logits = logits.masked_fill(hide[:, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if ctx.visible is not None:  # a pad's own query sees nothing: no NaN rows, no weight
        qvis = ctx.visible[:, end - w : end]
        probs = torch.where(qvis[:, None, None, :, None], probs, torch.zeros((), dtype=probs.dtype))
    return probs


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def compute_queries(module: nn.Module, hidden: Tensor, position_embeddings) -> Tensor:
    """Post-rotary queries [B, H_q, n, D] of ``hidden`` [B, n, hidden] (the attention's own input)."""
    b, n, _ = hidden.shape
    q = module.q_proj(hidden).view(b, n, -1, module.head_dim)
    norm = getattr(module, "q_norm", None)
    if norm is not None:  # Qwen3, Gemma 3 normalise queries before rotary
        q = norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos[:, -n:].unsqueeze(1), sin[:, -n:].unsqueeze(1)
    return q * cos + rotate_half(q) * sin


def pool1d(scores: Tensor, kernel: int, visible: Tensor | None = None) -> Tensor:
    """Average-pool [B, H, S] scores along S with an odd ``kernel`` (SnapKV's clustering).

    ``visible`` [B, S]: False for each row's pads and fillers, which come first (left padding); each
    row is pooled over its own slots only, the row's first slot being the sequence boundary, so a
    padded row pools with the same bits as alone (its pads score 0).
    """
    if kernel <= 1:
        return scores

    def avg(x: Tensor) -> Tensor:
        flat = x.reshape(-1, 1, x.shape[-1])
        return torch.nn.functional.avg_pool1d(
            flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False
        ).reshape(x.shape)

    if visible is None:
        return avg(scores)
    out = torch.zeros_like(scores)
    for b, first in enumerate((~visible).sum(-1).tolist()):
        if first < scores.shape[-1]:
            out[b, ..., first:] = avg(scores[b, ..., first:])
    return out


def hide_slots(mask: Tensor | None, hidden: Tensor, n: int, kv: int, groups: int, dtype: torch.dtype) -> Tensor:
    """The 4D attention mask of a forward of ``n`` new tokens over ``kv`` slots (the stored ones, then
    the new ones) of a layer where ``hidden`` [B, H_kv, h] (True = hidden) marks stored slots a KV head
    must not attend (AdaKV's head budgets; slots past the first ``h``, the new tokens among them, are
    not hidden). ``mask`` is the model's [B, 1, n, kv] mask (bool, or additive float) or None (no
    padding: causal only); ``hidden`` [B, 1, h] hides slots from every head. Returns [B, H_q or 1,
    n or 1, kv] of the same kind (None: additive ``dtype``)."""
    b, hkv, h = hidden.shape
    hide = torch.zeros(b, hkv, kv, dtype=torch.bool, device=hidden.device)
    hide[..., :h] = hidden.bool()
    if hkv > 1:  # one mask per KV head: each of its query heads; else one per row
        hide = hide.repeat_interleave(groups, dim=1)
    hide = hide[:, :, None, :]  # [B, H_q or 1, 1, kv]
    if mask is None:
        allowed = ~hide
        if n > 1:  # causal among the new tokens
            slot = torch.arange(kv, device=hidden.device)
            allowed = allowed & (slot[None, :] <= torch.arange(kv - n, kv, device=hidden.device)[:, None])
        return torch.zeros(allowed.shape, dtype=dtype, device=hidden.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)
