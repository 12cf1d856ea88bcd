"""What a policy's ``score`` sees for one layer (:class:`ScoreContext`), and the small helpers scores share:
tokens a method always keeps (``FORCE_KEEP``, :func:`keep_recent`), whether a row is over its budget,
and which keys the attention mask shows."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .attention import attention_probs
from .policy_cache import LayerState, PolicyCache

FORCE_KEEP = 1e30  # added to the score of tokens a method always keeps (windows, sinks)


@dataclass
class ScoreContext:
    """What a policy's ``score`` sees for one layer at one compression step."""

    module: nn.Module  # the attention module
    cache: PolicyCache
    layer_rank: int  # index among the cache's full-attention layers
    keys: Tensor  # [B, H_kv, S, D] all stored keys (post-rotary), full precision
    values: Tensor  # [B, H_kv, S, D]
    queries: Tensor | None  # [B, H_q, w, D] recent post-rotary queries (w <= stored tokens), or None
    visible: Tensor | None  # [B, S] bool, False for padding; None when nothing is padded
    scaling: float  # the module's softmax scaling
    target: int | Tensor = 0  # tokens this layer keeps (set before ``score``): one count, or [B] per row
    # on a forward the decode engine ran: its attention probabilities [B, H_q, n, S] of the forward's
    # n queries (the last n of ``queries`` when buffered), which ``attention`` reads instead of recomputing
    probs: Tensor | None = None

    @property
    def layer(self):
        """The layer's storage (an :class:`~infertrix.kvcache.EvictingLayer`)."""
        return self.cache.evicting_layers[self.layer_rank]

    @property
    def state(self) -> LayerState:
        """The policy's state of this layer (recent queries, per-token ``aux``)."""
        return self.cache.states[self.layer_rank]

    @property
    def num_layers(self) -> int:
        return len(self.cache.states)

    def upto(self, n: int) -> ScoreContext:
        """The context restricted to the first ``n`` stored tokens (a query block's past), no queries."""
        vis = self.visible[:, :n] if self.visible is not None else None
        return replace(self, keys=self.keys[:, :, :n], values=self.values[:, :, :n], queries=None, visible=vis,
                       probs=None)

    @property
    def num_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1] if self.queries is not None else 1

    def attention(self, last: int | None = None, logits_fn=None) -> Tensor:
        """Softmax attention of the last ``last`` buffered queries over the stored keys.

        Returns float32 [B, H_kv, G, w, S] (G query heads per KV head), causal (query i of the w
        sees slots up to its own) and with pads masked. ``logits_fn`` may transform the logits first
        (Keyformer's Gumbel noise). On an engine forward the engine's probabilities give the
        forward's own queries' rows (those of earlier forwards are recomputed from the buffer, as
        always; ``logits_fn`` needs logits, so it recomputes them all).
        """
        queries = self.queries if last is None else self.queries[:, :, -last:]
        if self.probs is None or logits_fn is not None:
            return attention_probs(queries, self, logits_fn)
        b, hq, n, s = self.probs.shape
        w = queries.shape[-2] if queries is not None else n
        own = min(w, n)
        rows = self.probs[:, :, n - own :].unflatten(1, (self.keys.shape[1], -1))  # [B, Hkv, G, own, S]
        if w == own:
            return rows
        older = attention_probs(queries[:, :, : w - own], self, end=s - own)
        return torch.cat([older, rows], dim=3)


def held(rows: int, stored: int, visible: Tensor | None) -> list[int]:
    """Each of ``rows`` rows' own tokens among the ``stored`` slots (``visible`` [B, S]: False for its
    pads and fillers)."""
    return [stored] * rows if visible is None else visible.sum(-1).tolist()


def over_budget(targets: list[int], stored: int, visible: Tensor | None) -> bool:
    """Whether some row holds more than its target of the ``stored`` slots (see :func:`held`)."""
    return any(h > t for h, t in zip(held(len(targets), stored, visible), targets, strict=True))


def keep_recent(scores: Tensor, ratio: float, target: int | Tensor) -> Tensor:
    """``scores`` [B, H, S] with the last ``int(ratio * target)`` slots of each row always kept
    (``target``: the layer's count, or [B] one per row)."""
    if isinstance(target, int):
        recent = int(ratio * target)
        if recent:
            scores[..., -recent:] += FORCE_KEEP
        return scores
    s = scores.shape[-1]
    recent = torch.tensor([int(ratio * t) for t in target.tolist()], device=scores.device)
    tail = torch.arange(s, device=scores.device)[None] >= s - recent[:, None]  # [B, S]
    return torch.where(tail[:, None, :], scores + FORCE_KEEP, scores)


def visible_keys(mask, s: int) -> Tensor | None:
    """[B, S] bool: keys the last query may attend (False for padding), from the 4D attention mask."""
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -s:]
    vis = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    if bool(vis.all()):
        return None
    return vis
