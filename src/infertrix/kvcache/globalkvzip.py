"""KVzip with one budget for the whole model: layers compete for it, each layer's heads keep the same tokens.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416, rank every (layer, head, token) reconstruction score of the cache at
once and keep the best share of all of them (non-uniform over layers and heads; kvpress's
``KVzipPress(layerwise=False)`` does so by masking, so no memory is freed). Here a layer's heads keep
the same tokens (a token scores its best head's score), so a layer stores exactly what it keeps, and the
layers share the model's budget (the uniform budget times the layers) by those scores: a layer whose
tokens the reconstruction reads more keeps more of them. The bytes held are then the budget's, as
:class:`~.kvzip.KVzip`'s, where :class:`~.adakv.AdaKVzip` holds each layer's largest head's count.

Each row is allocated on its own scores and its own length; in a batch a layer stores its largest
row's count and the other rows' extra slots are lead fillers (:mod:`~.rows`), so a padded row keeps
and decodes what it does alone, on the decode engine too. With ``decode_interval`` every re-read
(:class:`~.kvzip.KVzip`) re-ranks all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .adakv import ranked_scores
from .kvzip import KVzip
from .rows import best, keep_counts


def layer_counts(pooled: list[Tensor], totals: Tensor, floor: int) -> Tensor:
    """[B, L] tokens each layer keeps: the best ``totals`` [B] of each row's scores pooled over the
    layers (``pooled``: L tensors [B, S_l], -inf for pads, never counted), after each layer's own best
    ``floor``."""
    ranked = []
    for p in pooled:
        f = min(floor, p.shape[-1])
        if f:
            values, index = best(p, f)
            p = p.scatter(-1, index, torch.where(values > float("-inf"), float("inf"), values))
        ranked.append(p)
    flat = torch.cat(ranked, -1)
    sizes = torch.tensor([p.shape[-1] for p in pooled], device=flat.device)
    layer_of = torch.repeat_interleave(torch.arange(len(pooled), device=flat.device), sizes)
    values, index = best(flat, int(min(int(totals.max()), flat.shape[-1])))
    counted = (values > float("-inf")) & (torch.arange(values.shape[-1], device=flat.device) < totals[:, None])
    counts = torch.zeros(flat.shape[0], len(pooled), dtype=torch.long, device=flat.device)
    return counts.scatter_add_(1, layer_of[index], counted.long())


@register_transform("globalkvzip")
@dataclass
class GlobalKVzip(KVzip):
    """KVzip's reconstruction scores (Kim et al. 2025, arXiv:2505.23416) ranked over all layers at once:
    the model's budget (the uniform budget times the layers) goes to the best (layer, token) scores of
    each row, a token scoring its best KV head's score and every head of a layer keeping the same tokens;
    each layer keeps at least ``min_ratio`` of the uniform budget (and the sinks). Memory: the budget's
    (layers hold different lengths, as PyramidKV's); in a batch a layer stores its largest row's count
    (the other rows' extra slots are hidden fillers). Costs KVzip's second forward per compressed prompt. Lossy.

    - ``min_ratio``: a layer's floor as a fraction of the uniform budget (0: none; the paper's global
      ranking has none).
    """
    use_when = ("question-agnostic compression at the bytes of the budget, with layers given what the "
                "reconstruction reads; costs KVzip's second forward")

    min_ratio: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.min_ratio, int | float) or not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"GlobalKVzip.min_ratio must be in [0, 1] (a layer's floor as a fraction of the "
                              f"uniform budget), got {self.min_ratio!r}")

    def compress_scored(self, cache, keeps: dict[int, Tensor]) -> None:
        """Share each row's summed budget of the scored layers by its scores pooled over them, then keep
        each layer's count per row (the same tokens in every KV head; rows keeping fewer than the most
        get lead fillers, :mod:`~.rows`)."""
        ranks = list(keeps)
        layers = [cache.evicting_layers[r] for r in ranks]
        states = [cache.states[r] for r in ranks]
        scores = [ranked_scores(st, keeps[r], st.pending.visible) for r, st in zip(ranks, states, strict=True)]
        pooled = [s.amax(dim=1) for s in scores]  # [B, S_l]: a token's best head
        targets = [self.row_targets(cache, r) for r in ranks]  # [L][B]
        rows = []
        for b in range(pooled[0].shape[0]):  # each row on its own scores and budget, as alone
            row_targets = [t[b] for t in targets]
            floor = max(self.sink_tokens, int(self.min_ratio * min(row_targets)))
            total = torch.tensor([sum(row_targets)], device=pooled[0].device)
            rows.append(layer_counts([p[b : b + 1] for p in pooled], total, floor))
        counts = torch.cat(rows)  # [B, L]
        for i, (layer, state) in enumerate(zip(layers, states, strict=True)):
            heads = scores[i].shape[1]
            if bool((counts[:, i] < layer.stored_length).any()):
                shared = pooled[i][:, None, :].expand(-1, heads, -1)
                keep_counts(layer, state, shared, counts[:, i, None].expand(-1, heads))
            if self.decode_interval == 0:
                state.queries = None  # no compression reads them before the next prompt
            self.finish(layer, state)
