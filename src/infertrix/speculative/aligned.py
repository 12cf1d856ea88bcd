"""Rows that advance by different amounts over a cache whose rows must stay left-padded.

:class:`~.ragged.RaggedKV` lets each row keep a different number of tokens by leaving masked
holes inside the shorter rows. The decode engine (:mod:`infertrix.engine`) takes left padding
only, since its attention splits each row's keys at points counted from the row's first slot,
which is what makes a token's logits the same bits in a window, a batch row or a 1-token step.
:class:`AlignedKV` keeps every row hole-free instead: after a verification the cache is cut to
the longest row's kept end and each shorter row's keys and values move right to end there too
(its left padding grows by the difference; a memory move of that row, no model compute). Moved
tokens keep their distances from the row's first slot, so they attend with the same bits (the
engine's invariance) and greedy verification stays token-identical to plain decoding. A row's
window is ``[new tokens, padding]``, the padding at its end, where a crop removes it.

Used for the target's verification when ``generate`` runs on an :class:`~infertrix.engine.EngineCache`,
and for engine drafts (:mod:`.lean`). A row may carry junk (padding) at its end only until it
is fed again; feeding it first re-aligns the rows. (Until 2026-12-04 the cache was cut to the
shortest row's end and longer rows re-fed what they kept beyond it, at every step while rows
stayed apart: a batch-4 prompt-lookup run decoded at 0.2x plain.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine.cache import EngineCache, EngineLayer
from ..kvcache.capabilities import capabilities
from .ragged import RaggedKV, tree_layout


def engine_rows(cache, mask: Tensor | None) -> bool:
    """Whether a speculative call on ``cache`` should keep its rows aligned (:class:`AlignedKV`):
    an engine cache, and a prompt that is left-padded (or unpadded)."""
    if not isinstance(cache, EngineCache):
        return False
    if mask is None:
        return True
    m = mask.to(torch.long)
    return bool((m.cumsum(-1) > 0).long().sum(-1).eq(m.sum(-1)).all())


class AlignedKV(RaggedKV):
    """RaggedKV's calls (``prefill``, ``extend``, ``rollback``/``keep_fed``, ``retire``) over a
    cache kept in left-padded form (see the module docstring). Per row r in the cache: ``pos[r]``
    its logical tokens, ``seq[r]`` their ids, ``start[r]`` its first slot, ``real[r]`` the tokens
    with keys and values in the cache from there (slots after ``start[r] + real[r]`` are junk)."""

    def __init__(self, model: nn.Module, cache, pad_token_id: int):
        super().__init__(model, cache, pad_token_id)
        self.seq: list[list[int]] = []
        self.start: list[int] = []
        self.real: list[int] = []

    def can_retire(self) -> bool:
        # no holes, so sliding windows stay right after a row leaves
        layers = getattr(self.cache, "layers", ())
        return capabilities(self.cache).select_rows or (bool(layers) and all(type(ly) is EngineLayer for ly in layers))

    def retire(self, done: list[int]) -> None:
        before = self.present if self.present is not None else list(range(self.batch))
        super().retire(done)
        after = self.present if self.present is not None else list(range(self.batch))
        if after != before:
            keep = [before.index(b) for b in after]
            self.seq = [self.seq[i] for i in keep]
            self.start = [self.start[i] for i in keep]
            self.real = [self.real[i] for i in keep]

    def _set_mask(self, length: int) -> None:
        """The left-padding mask over ``length`` slots (ones from each row's start)."""
        cols = torch.arange(length, device=self.mask.device)[None, :]
        self.mask = (cols >= torch.tensor(self.start, dtype=torch.long, device=self.mask.device)[:, None]).long()

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, keep: int = 1) -> Tensor:
        logits = super().prefill(input_ids, attention_mask, keep)
        self.seq = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(input_ids.shape[0])]
        self.real = [len(s) for s in self.seq]
        self.start = [self.length - n for n in self.real]
        return logits

    def begin(self, batch: int, device: torch.device) -> None:
        """An empty cache of ``batch`` rows (a draft's, filled by its first ``extend``)."""
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.batch = batch
        self.present = None
        self.seq = [[] for _ in range(batch)]
        self.start = [0] * batch
        self.real = [0] * batch

    def _realign(self) -> None:
        """Cut the cache to the longest row's real end and move each shorter row's keys and values
        right, so that it ends there too (its left padding grows). A row's slots keep their order
        and their distances from its first slot, which is what the engine's split points count
        from, so moved tokens attend with the same bits; the move copies each shorter row's cache
        once (a memory move), where re-feeding the tokens beyond the shortest row's end ran them
        through the model again at every step while the rows stayed apart (a row that got ahead
        by 17 tokens made every later 1-token step of the batch a window of 18)."""
        ends = [s + r for s, r in zip(self.start, self.real, strict=True)]
        end = max(ends, default=0)
        if end < self.length:
            self.cache.crop(-(self.length - end))
        moved = False
        for row, (first, real) in enumerate(zip(self.start, self.real, strict=True)):
            shift = end - first - real
            if shift == 0:
                continue
            moved = True
            self.start[row] = end - real
            if real == 0:
                continue
            for layer in self.cache.layers:
                if layer.kbuf is None:  # a layer a draft's skip plan never runs holds nothing to move
                    continue
                for buf in (layer.kbuf, layer.vbuf):
                    seg = buf[row, :, first:end]  # [kv_heads, real + shift, head_dim]: junk after the row's end
                    seg.copy_(seg.roll(shift, dims=1))
        if moved or end < self.length:
            self._set_mask(end)

    def _realign_fed(self, fed: list[bool]) -> None:
        """Realign (:meth:`_realign`) before a forward when a row about to be fed ends before the
        cache does."""
        if any(f and s + r < self.length for f, s, r in zip(fed, self.start, self.real, strict=True)):
            self._realign()

    def _extend(self, rows: list[list[int]], keep: int | None) -> Tensor:
        """Feed each row its pending tokens and ``rows[r]``; logits ``[B, W, V]`` with row r's for its
        new tokens first, or ``[B, 1, V]`` after each row's last token when ``keep`` is 1 (rows end
        in different columns, so RaggedKV's "the last ``keep`` columns" has no other meaning here)."""
        if keep not in (None, 1):
            raise ValueError(f"AlignedKV.extend takes keep=None or 1, got {keep}")
        self._fed_from = self.pos
        device = self.mask.device
        self._realign_fed([bool(new) for new in rows])
        full = []
        for r, new in enumerate(rows):
            self.seq[r] = self.seq[r][: int(self.pos[r])] + list(new)
            full.append(self.seq[r][self.real[r]:] if new else [])
        width = max(len(f) for f in full)
        if width == 0:
            raise ValueError("AlignedKV.extend needs at least one token in some row")
        if self.length == 0:  # an empty cache: left-pad the window, as a prompt
            # a row with nothing to feed still gets one (junk) slot, so that no row is all padding
            self.start = [min(width - len(f), width - 1) for f in full]
            ids = [[self.pad] * (width - len(f)) + f for f in full]
            col = [width - len(n) for n in rows]
        else:
            ids = [f + [self.pad] * (width - len(f)) for f in full]
            col = [len(f) - len(n) for f, n in zip(full, rows, strict=True)]
        positions = torch.tensor([[max(0, self.real[r] + j - (self.start[r] if self.length == 0 else 0))
                                   for j in range(width)] for r in range(len(rows))], dtype=torch.long, device=device)
        self._set_mask(self.length + width)
        last = [min(c + max(len(n), 1) - 1, width - 1) for c, n in zip(col, rows, strict=True)]
        if keep == 1:  # each row's last token only: the head runs on those columns alone
            cols = sorted(set(last))
            logits = self._forward(torch.tensor(ids, dtype=torch.long, device=device), self.mask, positions,
                                   torch.tensor(cols, dtype=torch.long, device=device))
            idx = torch.tensor([[cols.index(c)] for c in last])
        else:
            logits = self._forward(torch.tensor(ids, dtype=torch.long, device=device), self.mask, positions, width)
            most = max(len(n) for n in rows)  # row r's logits for its new tokens: columns col[r] ..
            idx = (torch.tensor(col)[:, None] + torch.arange(most)[None, :]).clamp_max(width - 1)
        self.real = [r + len(f) for r, f in zip(self.real, full, strict=True)]
        self.pos = self.pos + torch.tensor([len(n) for n in rows], dtype=torch.long, device=device)
        idx = idx.to(device)
        return logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))

    def extend_tree(self, roots: list[int | None], trees: list) -> Tensor:
        """Feed each row in the cache its root (its newest token; None: a stopped row, fed nothing)
        then its :class:`~.tree.TokenTree`'s nodes in one forward with the tree's 4-D mask; logits
        ``[B, W, V]``, slot 0 the root, slot i + 1 node i. The decode engine reads the mask as a
        tree (``gqa_attention``'s ``tree``): each node attends with the bits it would have at the
        end of a linear window of its path. Call :meth:`keep_tree` next."""
        if self.length == 0:
            raise ValueError("AlignedKV.extend_tree needs a prefilled cache")
        live = [r is not None for r in roots]
        self._realign_fed(live)
        if any(a and r != int(p) for a, r, p in zip(live, self.real, self.pos, strict=True)):
            # a verified row holds keys and values for every token it kept (rollback keeps them)
            raise ValueError("AlignedKV.extend_tree: a row has tokens without keys and values; extend it first")
        self._fed_from = self.pos
        device = self.mask.device
        ids, depth, real, ancestors = (x.to(device) for x in tree_layout(roots, trees, self.pad))
        fed = real.sum(-1)
        positions = torch.tensor(self.real, dtype=torch.long, device=device)[:, None] + depth  # real == pos
        for r, (root, tree) in enumerate(zip(roots, trees, strict=True)):
            self.seq[r] = self.seq[r][: int(self.pos[r])] + ([root] + tree.tokens if root is not None else [])
            self.real[r] += int(fed[r])
        logits = self._forward(ids, self.tree_mask(ancestors), positions, ids.shape[1])
        self._set_mask(self.length + ids.shape[1])
        self.pos = self.pos + fed  # every node, until keep_tree
        return logits

    def keep_tree(self, paths: list[list[int]], kept: list[int]) -> None:
        """After :meth:`extend_tree` and the move of each row's accepted path to its first new
        slots (``tree.tree_keep``): its tokens follow the root in ``seq``, the rest is dropped.
        ``paths`` and ``kept`` are per logical row."""
        present = self.present if self.present is not None else list(range(len(paths)))
        for r, b in enumerate(present):
            fed = int(self._fed_from[r])
            nodes = self.seq[r][fed:]
            self.seq[r] = self.seq[r][:fed] + nodes[:1] + [nodes[slot] for slot in paths[b]]
        self.keep_fed(kept)

    def _rollback(self, counts: Tensor) -> None:
        if bool((counts > self.pos).any()):
            raise ValueError("AlignedKV.rollback cannot keep more tokens than a row has")
        kept = counts.tolist()
        self.seq = [s[:k] for s, k in zip(self.seq, kept, strict=True)]
        self.real = [min(r, k) for r, k in zip(self.real, kept, strict=True)]
        self.pos = counts
        self._realign()
