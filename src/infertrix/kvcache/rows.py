"""Keeping a different number of tokens per row and per KV head in one ``[B, H_kv, S, D]`` layer.

A row's budget follows its own length (not the batch's padded one), and head-wise budgets (AdaKV)
give each KV head its own count, yet a layer stores one length ``S`` for every row and head, which
is what sdpa and the decode engine read. So a layer stores the largest count; within a row, a head
that keeps fewer than the row's widest head hides its extra slots (its next-best tokens) by a per-head
mask (``LayerState.aux[HIDDEN]``); a row that keeps fewer than the widest row puts its extra slots
first, as ``lead`` fillers hidden like left padding (``EvictingLayer.first_slots``). After its lead,
a row's slots are then exactly what it stores when it runs alone, in the same order, so attention,
rescoring and pooling over them do not depend on the other rows of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .merge import merge_evicted
from .policy_cache import HIDDEN, LayerState


def best(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the ``k`` highest ``scores`` along the last dim, best first, ties to the lower
    index: a stable sort, so that a row padded or with fillers before its tokens (which shift its indices,
    not their order) picks the same tokens among equal scores as alone (``topk`` breaks ties either way)."""
    out = scores.sort(dim=-1, descending=True, stable=True)
    return out.values[..., :k], out.indices[..., :k]


def keep_counts(layer, state: LayerState, scores: Tensor, budgets: Tensor, keys: Tensor | None = None,
                values: Tensor | None = None, merge_threshold: float | None = None,
                visible: Tensor | None = None) -> None:
    """Keep each (row, KV head)'s best ``budgets`` [B, H] tokens of ``scores`` [B, H, S] (see the
    module docstring for the layout); ``merge_threshold``: merge the row's evicted tokens into what it
    keeps (D2O, :func:`~.merge.merge_evicted`; ``visible`` [B, S] False for pads) instead of dropping them."""
    s = scores.shape[-1]
    width = int(budgets.max())
    rows = budgets.amax(dim=1)  # [B] the row's widest head
    ranked = best(scores, width)[1]  # best first
    rank = torch.arange(width, device=scores.device)
    own = rank < rows[:, None, None]  # the row's own slots; the rest are its lead fillers
    order = torch.where(own, ranked, ranked - s).argsort(dim=-1)  # fillers first, then by position
    keep = ranked.gather(-1, order)
    kept = (rank < budgets[..., None]).gather(-1, order)  # [B, H, W] slots the head attends
    if merge_threshold is not None:
        if keys is None:
            keys, values = layer.full_keys_values()
        keys, values = merge_evicted(keys, values, keep, visible, merge_threshold, kept)
    layer.compress(keep, keys, values, lead=width - rows)
    state.keep(keep)
    hide = own.expand_as(order).gather(-1, order) & ~kept  # hidden per head within the row's own slots
    if bool(hide.any()):
        state.aux[HIDDEN] = hide
    else:
        state.aux.pop(HIDDEN, None)


def row_budgets(targets: list[int], heads: int, device) -> Tensor:
    """[B, H] budgets: each row's target in every KV head."""
    return torch.tensor(targets, dtype=torch.long, device=device)[:, None].expand(-1, heads)


def hidden_slots_of(layer, per_head: Tensor | None) -> Tensor | None:
    """[B, H_kv or 1, h] the stored slots each KV head (1: every head) must not attend: ``per_head``
    (head budgets) and each row's ``lead`` fillers (kvcache/rows.py), or None when there are none."""
    if layer.lead is None:
        return per_head
    s = layer.stored_length
    hide = (torch.arange(s, device=layer.lead.device)[None] < layer.lead[:, None])[:, None, :]  # [B, 1, S]
    if per_head is None:
        return hide  # one mask per row: KIVI's fused step and sdpa keep a [B, 1, n, kv] mask
    hide = hide.expand(-1, per_head.shape[1], -1)
    h = min(s, per_head.shape[-1])
    hide = hide.clone()
    hide[..., :h] |= per_head[..., :h].bool()
    return hide
