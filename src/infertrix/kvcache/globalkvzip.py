"""KVzip with one budget for the whole model: layers compete for it, each layer's heads keep the same tokens.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416, rank every (layer, head, token) reconstruction score of the cache at
once and keep the best share of all of them (non-uniform over layers and heads; kvpress's
``KVzipPress(layerwise=False)`` does so by masking, so no memory is freed). Here a layer's heads keep
the same tokens (a token scores its best head's score), so a layer stores exactly what it keeps, and the
layers share the model's budget (the uniform budget times the layers) by those scores: a layer whose
tokens the reconstruction reads more keeps more of them. The bytes held are then the budget's, as
:class:`~.kvzip.KVzip`'s, where :class:`~.adakv.AdaKVzip` holds each layer's largest head's count.

Each row is allocated on its own scores; in a batch a layer stores its largest row's count and hides
the other rows' extra slots (their next-best tokens) by the per-head mask :class:`~.adakv.AdaKV` uses,
so a padded row keeps what it keeps alone when the budget is a token count (with a ratio the budget
follows the padded length, as for every policy: docs/kvcache.md, "Padding").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .adakv import keep_counts, ranked_scores
from .kvzip import KVzip


def layer_counts(pooled: list[Tensor], totals: Tensor, floor: int) -> Tensor:
    """[B, L] tokens each layer keeps: the best ``totals`` [B] of each row's scores pooled over the
    layers (``pooled``: L tensors [B, S_l], -inf for pads, never counted), after each layer's own best
    ``floor``."""
    ranked = []
    for p in pooled:
        f = min(floor, p.shape[-1])
        if f:
            best = p.topk(f, dim=-1)
            p = p.scatter(-1, best.indices, torch.where(best.values > float("-inf"), float("inf"), best.values))
        ranked.append(p)
    flat = torch.cat(ranked, -1)
    sizes = torch.tensor([p.shape[-1] for p in pooled], device=flat.device)
    layer_of = torch.repeat_interleave(torch.arange(len(pooled), device=flat.device), sizes)
    top = flat.topk(int(min(int(totals.max()), flat.shape[-1])), dim=-1)
    counted = (top.values > float("-inf")) & (torch.arange(top.values.shape[-1], device=flat.device) < totals[:, None])
    counts = torch.zeros(flat.shape[0], len(pooled), dtype=torch.long, device=flat.device)
    return counts.scatter_add_(1, layer_of[top.indices], counted.long())


@register_transform("globalkvzip")
@dataclass
class GlobalKVzip(KVzip):
    """KVzip's reconstruction scores (Kim et al. 2025, arXiv:2505.23416) ranked over all layers at once:
    the model's budget (the uniform budget times the layers) goes to the best (layer, token) scores of
    each row, a token scoring its best KV head's score and every head of a layer keeping the same tokens;
    each layer keeps at least ``min_ratio`` of the uniform budget (and the sinks). Memory: the budget's
    (layers hold different lengths, as PyramidKV's); in a batch a layer stores its largest row's count
    and masks the other rows' extra slots. Costs KVzip's second forward per compressed prompt. Lossy.

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
        if self.decode_interval:
            raise ConfigError(
                f"GlobalKVzip.decode_interval must be 0, got {self.decode_interval}: in a batch a layer masks the "
                "slots some rows do not keep, and rescoring while decoding would run over them (a padded row would "
                "not decode as alone); use KVzip with decode_interval"
            )

    def compress_scored(self, cache, keeps: dict[int, Tensor]) -> None:
        """Share the scored layers' summed budget by each row's scores pooled over them, then keep each
        layer's count per row (the same tokens in every KV head)."""
        ranks = list(keeps)
        layers = [cache.evicting_layers[r] for r in ranks]
        states = [cache.states[r] for r in ranks]
        scores = [ranked_scores(st, keeps[r], st.pending.visible) for r, st in zip(ranks, states, strict=True)]
        pooled = [s.amax(dim=1) for s in scores]  # [B, S_l]: a token's best head
        targets = [self.layer_target(ly.cumulative_length, r, len(cache.states)) for r, ly in zip(ranks, layers, strict=True)]
        floor = max(self.sink_tokens, int(self.min_ratio * min(targets)))
        b = pooled[0].shape[0]
        totals = torch.full((b,), sum(targets), dtype=torch.long, device=pooled[0].device)
        counts = layer_counts(pooled, totals, floor)
        widest = counts[int(counts.sum(-1).argmax())]  # the row that keeps the most
        for i, (layer, state) in enumerate(zip(layers, states, strict=True)):
            self.log_step(cache.log, layer.cumulative_length)
            if int(counts[:, i].max()) > int(widest[i]):
                cache.log.note("the batch's rows split the budget over layers differently, and a layer stores its "
                               "largest row's count (the other rows' extra slots masked)")
            heads = scores[i].shape[1]
            if bool((counts[:, i] < layer.stored_length).any()):
                shared = pooled[i][:, None, :].expand(-1, heads, -1)
                keep_counts(layer, state, shared, counts[:, i, None].expand(-1, heads))
            state.queries = None  # decode_interval is 0 (validate): no compression reads them before the next prompt
            self.finish(layer, state)
