"""Rows that advance by different amounts over one KV cache of one length.

After a verification, row 0 may keep 5 new tokens and row 1 only 1; transformers' caches have
one length for the whole batch, and rewriting (re-padding) every layer's keys and values to
re-align the rows would copy the whole cache each step. Instead every row keeps its own
*logical* position and its own 2-D attention mask: the cache is cropped (``Cache.crop``) to the
longest row's kept length, and the slots a shorter row did not keep stay in the cache as holes
its mask hides. Position ids are passed explicitly per row, so rotary embeddings see each row's
true positions and the holes are invisible to the model. Cost: a few masked slots per step;
benefit: no cache copy, and any croppable ``Cache`` works.

Rows that have finished (eos, or their length) can be *retired* (:meth:`RaggedKV.retire`): they
leave the cache (``Cache.batch_select_indices``, one copy per retirement), so the forwards that
follow compute only the rows still generating. Plain ``generate`` keeps computing finished rows
(it pads them) until the last row ends; on a CPU, where a batch-4 verification is bound by its
arithmetic, the rows that finish early would otherwise cost as much as the ones still running.

Holes change which slots a *sliding-window* layer sees (its window counts cache slots), so a
batch with rows of unequal progress is refused on models with sliding-window layers once the
cache reaches the window; a single row never has holes and works on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..core.generation import cache_argument_name
from ..core.transform import UnsupportedModelError
from ..kvcache.capabilities import capabilities


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers, or None if it has none."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return int(window) if any("sliding" in str(t) for t in types) else None
    return int(window) if getattr(cfg, "use_sliding_window", True) else None


class RaggedKV:
    """A cache plus per-row attention mask and positions; ``extend`` feeds each row its own
    tokens, ``keep``/``rollback`` drop what a row did not keep."""

    no_trees: str | None = None  # why this kind of cache cannot verify token trees (None: it can)

    def __init__(self, model: nn.Module, cache, pad_token_id: int):
        if not hasattr(cache, "crop"):
            raise UnsupportedModelError(
                f"speculative decoding rolls the KV cache back with Cache.crop, which {type(cache).__name__} "
                "lacks; use a DynamicCache (the default) or a cache policy whose layers can be cropped"
            )
        if getattr(cache, "is_compileable", False):
            raise UnsupportedModelError(
                f"speculative decoding needs a growing cache, got {type(cache).__name__}; "
                "drop cache_implementation='static' (a DynamicCache is used by default)"
            )
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # sliding-window layers keep what a crop may restore
        self.model = model
        self.cache = cache
        self.cache_kw = cache_argument_name(model)
        self.pad = pad_token_id
        self.mask: Tensor | None = None  # [B, S] long, 1 = a real token of that row
        self.pos: Tensor | None = None  # [B] long, real tokens cached per row
        self.window = sliding_window(model)
        # logical rows still in the cache, in cache order (None: all of them); mask/pos hold only those
        self.present: list[int] | None = None
        self.batch = 0
        self._fed_from: Tensor | None = None  # pos before the last extend

    def can_retire(self) -> bool:
        """Whether finished rows can leave this cache: the model has no sliding window and the cache
        selects batch rows exactly (a plain full-attention DynamicCache or GrowingCache)."""
        return self.window is None and capabilities(self.cache).select_rows

    def retire(self, done: list[int]) -> None:
        """Drop the logical rows ``done`` from the cache for good (they must never be fed again);
        a no-op when nothing new is done, when it would empty the batch, or when the cache cannot."""
        present = self.present if self.present is not None else list(range(self.batch))
        done = set(done)
        keep = [i for i, b in enumerate(present) if b not in done]
        if len(keep) == len(present) or not keep or not self.can_retire():
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.pos = self.pos[idx]
        if self._fed_from is not None:
            self._fed_from = self._fed_from[idx]
        self.present = [present[i] for i in keep]
        used = self.mask.any(0).nonzero()  # the retired rows' tail slots may now be unused
        new_len = int(used.max()) + 1 if used.numel() else 0
        if new_len < self.length:
            self.cache.crop(-(self.length - new_len))
            self.mask = self.mask[:, :new_len]

    @contextmanager
    def forward_with(self, forward: Callable[[Tensor, Tensor, Tensor, int | Tensor], Tensor]) -> Iterator[None]:
        """Run this cache's forwards through ``forward`` (ids, mask, positions, keep -> logits) for a
        while: a draft of the model's own layers drafting on the model's cache (``share_cache``)."""
        self._forward = forward  # the instance attribute shadows the method
        try:
            yield
        finally:
            del self._forward

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, keep: int) -> Tensor:
        return self.logits_of(self.model, ids, mask, positions, keep)

    def logits_of(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, keep: int) -> Tensor:
        """``model``'s forward over this cache (the model's own, or a draft of its layers drafting on
        it: ``share_cache``)."""
        # no padding and no holes: pass no mask, as generate does, so transformers takes its
        # causal fast path (and computes exactly what plain decoding computes)
        out = model(
            input_ids=ids,
            attention_mask=None if bool(mask.all()) else mask,
            position_ids=positions,
            **{self.cache_kw: self.cache},
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, keep: int = 1) -> Tensor:
        """Run the (left-padded) prompt; positions as ``generate`` computes them."""
        mask = attention_mask.to(torch.long)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self._forward(input_ids, mask, positions, keep)
        self.mask = mask
        self.pos = mask.sum(-1)
        self.batch = mask.shape[0]
        self.present = None
        _trim_sliding(self.cache)
        return logits

    def extend(self, rows: list[list[int]], keep: int | None = None) -> Tensor:
        """Append row b's tokens ``rows[b]`` (rows may differ in length, even be empty); returns
        logits ``[B, W, V]`` for the W = longest row's slots (row b's are the first len(rows[b]);
        a retired row's are zeros)."""
        if self.present is not None:
            if any(rows[b] for b in set(range(len(rows))) - set(self.present)):
                raise ValueError("RaggedKV.extend: a retired row cannot be fed again")
            inner = self._extend([rows[b] for b in self.present], keep)
            out = inner.new_zeros((len(rows), *inner.shape[1:]))
            out[torch.tensor(self.present, device=inner.device)] = inner
            return out
        return self._extend(rows, keep)

    def _extend(self, rows: list[list[int]], keep: int | None) -> Tensor:
        self._fed_from = self.pos
        device = self.mask.device
        widths = [len(r) for r in rows]
        width = max(widths)
        if width == 0:
            raise ValueError("RaggedKV.extend needs at least one token in some row")
        if self.window is not None and len(rows) > 1 and self.length + width >= self.window and self._holes(widths):
            raise UnsupportedModelError(
                "speculative decoding with batch size > 1 is not supported on models with "
                "sliding-window attention layers (rows advance unevenly, which would shift each row's "
                "window); generate with batch size 1, or use a model without sliding-window layers"
            )
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        new_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        positions = self.pos[:, None] + torch.arange(width, device=device)[None, :]
        mask = torch.cat([self.mask, new_mask], dim=1)
        logits = self._forward(ids, mask, positions, keep if keep is not None else width)
        self.mask = mask
        self.pos = self.pos + new_mask.sum(-1)
        # no crop here: a sliding-window layer keeps its past until `rollback` decides
        return logits

    def keep_fed(self, kept: list[int]) -> None:
        """Keep the first ``kept[b]`` of the tokens the last ``extend`` fed to logical row b
        (``rollback`` in terms of that feed; retired rows are ignored)."""
        self._rollback(self._fed_from + self._present_rows(kept))

    def tree_mask(self, ancestors: Tensor) -> Tensor:
        """The 4-D attention mask ``[B, 1, W, cached + W]`` of a token-tree forward: each fed slot
        sees its row's cache (this cache's 2-D mask) and its ancestors-or-self ``ancestors``
        ``[B, W, W]`` among the fed slots; additive (0 / dtype min) for eager attention, else bool."""
        width = ancestors.shape[-1]
        allowed = torch.cat([self.mask.bool()[:, None, :].expand(-1, width, -1), ancestors], dim=-1)[:, None]
        if self.model.config._attn_implementation != "eager":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _holes(self, widths: list[int]) -> bool:
        """Whether some row has a masked slot after its first real token (now or after this step)."""
        if len(set(widths)) > 1:
            return True
        started = self.mask.cumsum(-1) > 0
        return bool((started & (self.mask == 0)).any())

    def _present_rows(self, values: list[int] | Tensor) -> Tensor:
        """One value per logical row -> the values of the rows still in the cache, in cache order."""
        values = torch.as_tensor(values, dtype=torch.long, device=self.mask.device)
        if self.present is None:
            return values
        return values[torch.tensor(self.present, device=values.device)]

    def rollback(self, counts: list[int] | Tensor) -> None:
        """Keep only the first ``counts[b]`` real tokens of row b (one count per row of the batch;
        a retired row's is ignored); crop the cache to the longest. Call it after every ``extend``
        (with the unchanged positions to keep everything)."""
        self._rollback(self._present_rows(counts))

    def _rollback(self, counts: Tensor) -> None:
        """``rollback`` with one count per row still in the cache."""
        if bool((counts > self.pos).any()):
            raise ValueError("RaggedKV.rollback cannot keep more tokens than a row has")
        if bool((counts == self.pos).all()):
            _trim_sliding(self.cache)
            return
        self.mask = self.mask * (self.mask.cumsum(-1) <= counts[:, None]).long()
        used = self.mask.any(0).nonzero()
        new_len = int(used.max()) + 1 if used.numel() else 0
        self.cache.crop(-(self.length - new_len))
        self.mask = self.mask[:, :new_len]
        self.pos = counts


def tree_layout(roots: list[int | None], trees: list, pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input ids, depths, real-slot mask, ancestors-or-self [B, W, W]) of the slots a token-tree
    forward feeds: per row its root then its :class:`~.tree.TokenTree`'s nodes, padded to the widest
    row (a row without a root, one that has stopped, feeds nothing real; a padding slot sees itself)."""
    from ..ops.engine import tree_paths

    width = 1 + max(len(t) for t in trees)
    ids, parents, real = [], [], []
    for root, tree in zip(roots, trees, strict=True):
        n = 1 + len(tree) if root is not None else 0
        ids.append(([root] + tree.tokens if n else []) + [pad] * (width - n))
        parents.append(([-1] + [p + 1 for p in tree.parents] if n else []) + [-1] * (width - n))
        real.append([1] * n + [0] * (width - n))
    depth, ancestors = tree_paths(torch.tensor(parents, dtype=torch.long))
    return torch.tensor(ids), depth, torch.tensor(real), ancestors


def _trim_sliding(cache) -> None:
    """Let sliding-window layers drop the past they kept for a possible rollback (transformers'
    ``crop(0)``). Only those layers: other layer classes may read 0 as "keep 0 tokens" (the
    kvcache family's ``EvictingLayer`` treats a non-negative argument as the length to keep)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "sliding_window", None) and getattr(layer, "is_initialized", True):  # not before any token
            layer.crop(0)
