"""AdaKV: a layer's budget shared out over its KV heads by the scores themselves (head-wise budgets).

Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", https://arxiv.org/abs/2407.11550.

A method that keeps the same number of tokens in every KV head gives a head whose attention sits on a
few tokens as many as one whose attention is spread over many. AdaKV keeps the layer's total
(``budget x KV heads``) but lets the heads compete for it: the best (head, token) scores pooled over
the layer's heads win, after each head's own best ``alpha x budget`` tokens (the paper's safeguard), so
concentrated heads hand budget to diffuse ones. It sits on any scorer's ``score``: :class:`HeadBudgets`
replaces only ``evict``; ``AdaKV`` is it on SnapKV's scores (the paper's main pairing).

The storage: a layer holds ``[B, H_kv, S, D]``, the same length in every KV head, which is what sdpa
and the decode engine read. Heads of different lengths would need ragged storage and an attention
kernel over it (varlen attention, the paper's CUDA kernels), a change of storage and attention for the
whole family. So each layer stores the largest head's count and the other heads' extra slots (their
next-best tokens) are hidden from them by a per-head attention mask (``LayerState.aux[HIDDEN]``,
folded into the 4D mask by the attention pre-hook), as kvpress's ``AdaKVPress`` masks. The memory is
therefore the largest head's budget, more than SnapKV's at the same ``budget`` (``describe()`` and
``kv_bytes`` count the storage really held, and the mask in ``policy_state_bytes``); at the same memory,
SnapKV with that larger budget keeps every token AdaKV shows each head and more. AdaKV is here to reproduce
the paper's comparison at equal nominal budgets, and for a ragged storage to come. Decoding runs on the
module path (the engine reads one mask per row, not per head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .kvzip import KVzip
from .policy import KVPolicy
from .policy_cache import HIDDEN, LayerState
from .rows import best, keep_counts
from .snapkv import SnapKV


def head_budgets(scores: Tensor, target: int, alpha: float) -> Tensor:
    """[B, H] tokens each KV head keeps of ``scores`` [B, H, S] (-inf: pads, never counted): each
    head's best ``int(alpha * target)`` (at least 1 when ``alpha`` > 0), then the best of the rest
    pooled over the heads, ``H x target`` in all (fewer when a row has fewer tokens)."""
    b, h, s = scores.shape
    floor = min(target, max(1, int(alpha * target))) if alpha > 0 else 0
    ranked = scores
    if floor:  # the safeguard: each head's own best first
        values, index = best(scores, floor)
        ranked = scores.scatter(-1, index, torch.where(values > float("-inf"), float("inf"), values))
    flat = ranked.reshape(b, h * s)
    values, index = best(flat, min(h * target, h * s))
    counted = (values > float("-inf")).long()
    return torch.zeros(b, h, dtype=torch.long, device=scores.device).scatter_add_(1, index // s, counted)


@dataclass
class HeadBudgets(KVPolicy):
    """AdaKV's head-wise budgets over any method's ``score`` (a base to put first:
    ``class AdaTOVA(HeadBudgets, TOVA)``; see the module docstring for the storage and its cost).

    - ``alpha``: each head keeps at least this fraction of the uniform budget (the paper's safeguard: 0.2).
    """

    alpha: float = 0.2

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{name}.alpha must be in [0, 1] (a head's floor as a fraction of the budget), got {self.alpha!r}")
        if self.merge:
            raise ConfigError(f"{name} hides evicted tokens per head and does not merge them; use merge=False")

    def evict(self, layer, state: LayerState, scores: Tensor, target: int | list[int], visible: Tensor | None,
              keys: Tensor | None = None, values: Tensor | None = None) -> None:
        """Keep the layer's ``target x H_kv`` best (head, token) pairs of each row (``target``: one
        count, or one per row): each head's budget from :func:`head_budgets`, stored at the row's
        largest head's count with the rest hidden per head (:func:`~.rows.keep_counts`)."""
        scores = ranked_scores(state, scores, visible)
        targets = target if isinstance(target, list) else [target] * scores.shape[0]
        budgets = torch.cat([head_budgets(scores[i : i + 1], t, self.alpha) for i, t in enumerate(targets)])
        keep_counts(layer, state, scores, budgets)
        if self.decode_interval == 0:
            state.queries = None


def ranked_scores(state: LayerState, scores: Tensor, visible: Tensor | None) -> Tensor:
    """``scores`` [B, H, S] as float, slots an earlier compression hid just above pads (-inf)."""
    scores = scores.float()
    hidden = state.aux.get(HIDDEN)
    if hidden is not None:  # hidden by an earlier compression: after every token, before pads
        low = torch.finfo(torch.float32).min
        scores = torch.cat([scores[..., : hidden.shape[-1]].masked_fill(hidden, low), scores[..., hidden.shape[-1] :]], -1)
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))  # pads go first
    return scores


@register_transform("adakv")
@dataclass
class AdaKV(HeadBudgets, SnapKV):
    """SnapKV's scores (its observation window kept in every head) with AdaKV's head-wise budgets:
    the layer's ``budget x KV heads`` goes to the best (head, token) scores pooled over its heads, each
    head keeping at least ``alpha x budget``. Memory: the largest head's budget per layer (the other
    heads' extra slots are masked per head), so more than SnapKV's at the same budget. Decodes on the
    module path. Lossy.
    """
    use_when = ("the paper's head-wise budgets at a nominal budget (SnapKV scores); stores the largest "
                "head's count, so it holds more KV than SnapKV at the same budget")


@register_transform("adakvzip")
@dataclass
class AdaKVzip(HeadBudgets, KVzip):
    """KVzip's reconstruction scores (Kim et al. 2025, arXiv:2505.23416) with the layer's budget shared
    over its KV heads by those scores: KVzip allocates non-uniformly over heads (kvpress's
    ``KVzipPress`` even over all layers and heads at once, by masking); this shares it within each
    layer, with no per-head floor by default (``alpha=0``: KVzip uses no safeguard). Memory: the largest
    head's budget per layer, the other heads' extra slots masked per head (as :class:`AdaKV`). Costs
    KVzip's second forward per compressed prompt. Lossy.
    """
    use_when = ("question-agnostic compression where KVzip's per-head budgets lose what some heads need; "
                "stores the largest head's count per layer")

    alpha: float = 0.0
