"""Token-tree verification: several draft branches checked in one forward, the longest accepted path kept.

SpecInfer (Miao et al. 2024, https://arxiv.org/abs/2305.09781) verifies a *token tree*: the drafts
of several branches share their common prefixes, every node attends to its ancestors only (a tree
attention mask) at the position of its depth, and one forward scores them all. On a CPU a forward
over 20-60 positions costs little more than over one, so branches are cheap guesses.

- **Greedy**: from the root (the row's newest token), descend into the child whose token is the
  model's argmax at the current node while there is one; then emit the argmax. Token-identical to
  plain greedy decoding.
- **Sampling**: SpecInfer's multi-draft rule with point-mass drafts (recursive rejection
  sampling): at a node with target distribution ``p``, try its children in order; child ``c`` is
  accepted with probability ``p(c)`` (``p`` renormalised), and on rejection ``p(c)`` is set to 0;
  when no child is accepted a token is drawn from what is left of ``p``. Each token is emitted with
  exactly its probability under ``p`` (the chi-square test in tests/speculative checks it).

The forward feeds ``[root, nodes...]`` per row with a 4-D mask ``[B, 1, W, cached + W]`` (the row's
2-D mask over the cache, its ancestor matrix over the new slots) and per-node positions; the cache
then holds every node, so the accepted path's keys and values are moved to the first new slots and
the rest cropped (:class:`~.ragged.RaggedKV`'s ``keep_fed``). Rows of a batch carry trees of
different sizes. Only plain full-attention caches take trees (a sliding window or a cache policy
gets the tree's first branch, verified as a linear draft). On the decode engine's cache
(:class:`~.aligned.AlignedKV`) the engine verifies the tree: it reads the mask as a tree and each
node attends with the bits of the same token at the end of a linear window of its path, so
greedy trees stay token-identical to plain decoding on quantized targets too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kvcache.capabilities import capabilities
from .aligned import AlignedKV
from .ragged import tree_layout

TREE_ATTENTION = ("sdpa", "eager", "infertrix_sdpa")  # attention functions that read a custom 4-D mask


@dataclass
class TokenTree:
    """Draft nodes in topological order: ``tokens[i]`` with parent ``parents[i]`` (an earlier node,
    or -1 for a child of the row's newest token). Siblings are tried in their order here."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self) -> list[list[int]]:
        """Children of each slot (slot 0 = the root, slot i + 1 = node i), as node slots."""
        kids: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i + 1)
        return kids

    def pruned(self, max_depth: int) -> TokenTree:
        """The nodes at depth <= max_depth (a row near its end may take only that many tokens)."""
        keep, index = [], {}
        for i, d in enumerate(self.depths()):
            if d <= max_depth:
                index[i] = len(keep)
                keep.append(i)
        return TokenTree([self.tokens[i] for i in keep], [index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in keep])

    def first_branch(self) -> list[int]:
        """Tokens along the first child at every level (the drafter's best guess)."""
        kids, out, slot = self.children(), [], 0
        while kids[slot]:
            slot = kids[slot][0]
            out.append(self.tokens[slot - 1])
        return out


def tree_problem(ragged) -> str | None:
    """Why this call's cache and attention cannot verify trees (drafts then verify their first
    branch only, and the speculative stats say so), or None."""
    impl = getattr(ragged.model.config, "_attn_implementation", None)
    if ragged.no_trees:
        return ragged.no_trees
    if ragged.window is not None:
        return "a sliding-window cache"
    engine_rows = isinstance(ragged, AlignedKV) and ragged.can_retire()  # EngineLayers: plain buffers
    if not (capabilities(ragged.cache).select_rows or engine_rows):
        return "a cache that cannot select rows"
    if impl not in TREE_ATTENTION:
        return f"attention {impl!r} reads no custom mask"
    return None


def tree_extend(ragged, roots: list[int | None], trees: list[TokenTree]) -> Tensor:
    """Feed each logical row its root then its tree's nodes in one forward; logits ``[B, W, V]``
    (slot 0 = the root; a retired row's are zeros). Call :func:`tree_keep` next."""
    present = ragged.present if ragged.present is not None else list(range(len(roots)))
    if isinstance(ragged, AlignedKV):  # the decode engine's cache: rows kept left-padded
        out = ragged.extend_tree([roots[b] for b in present], [trees[b] for b in present])
        return _scatter_rows(out, present, len(roots)) if ragged.present is not None else out
    ids, depth, real, anc = tree_layout([roots[b] for b in present], [trees[b] for b in present], ragged.pad)
    device = ragged.mask.device
    ids, depth, real, anc = ids.to(device), depth.to(device), real.to(device), anc.to(device)
    width = ids.shape[1]
    mask = ragged.tree_mask(anc)
    out = ragged.model(
        input_ids=ids, attention_mask=mask, position_ids=ragged.pos[:, None] + depth,
        **{ragged.cache_kw: ragged.cache}, use_cache=True, logits_to_keep=width,
    ).logits
    ragged._fed_from = ragged.pos
    ragged.mask = torch.cat([ragged.mask, real], dim=1)
    ragged.pos = ragged.pos + real.sum(-1)
    return out if ragged.present is None else _scatter_rows(out, present, len(roots))


def _scatter_rows(out: Tensor, present: list[int], rows: int) -> Tensor:
    """Logits of the rows in the cache -> one per logical row (a retired row's are zeros)."""
    full = out.new_zeros((rows, *out.shape[1:]))
    full[torch.tensor(present, device=out.device)] = out
    return full


def tree_keep(ragged, paths: list[list[int]], width: int, kept: list[int]) -> None:
    """Keep logical row b's root and its accepted path ``paths[b]`` (node slots, root excluded) of
    the ``width`` slots the last :func:`tree_extend` fed: their keys and values move to the first
    new slots, the other nodes are dropped. ``kept[b]``: slots row b keeps (0 for a stopped row)."""
    present = ragged.present if ragged.present is not None else list(range(len(paths)))
    start = ragged.length - width
    idx = torch.arange(width).repeat(len(present), 1)
    for r, b in enumerate(present):
        for j, slot in enumerate(paths[b]):
            idx[r, j + 1] = slot
    if bool((idx != torch.arange(width)).any()):
        for layer in ragged.cache.layers:
            for t in (layer.keys, layer.values):
                if t is None:  # a layer a skip plan never runs holds nothing
                    continue
                new = t[:, :, start:]
                gather = idx.to(t.device)[:, None, :, None].expand(new.shape)
                new.copy_(new.gather(2, gather))
    if isinstance(ragged, AlignedKV):
        ragged.keep_tree(paths, kept)
    else:
        ragged.keep_fed(kept)


def tree_scores(call, logits: Tensor, rows, trees: list[TokenTree], active: list[int]) -> Tensor:
    """The call's logits processors at every slot, with the history of that slot's path."""
    processors = call.processors
    if not processors:
        return logits
    batch, width, vocab = logits.shape
    if call.history_free:
        dummy = torch.zeros((batch * width, 1), dtype=torch.long, device=logits.device)
        return processors(dummy, logits.reshape(batch * width, vocab)).reshape(batch, width, vocab)
    from .loop import _row_view

    out = logits.clone()
    for b in active:
        row_processors = _row_view(processors, b, batch)
        base = rows.stopper.row_ids(b, rows.gen[b])
        t = trees[b]
        paths: list[list[int]] = [[]]
        for tok, p in zip(t.tokens, t.parents, strict=True):
            paths.append(paths[p + 1] + [tok])
        for slot, path in enumerate(paths):
            seq = torch.cat([base, base.new_tensor(path)]) if path else base
            out[b, slot] = row_processors(seq[None], logits[b, slot][None])[0]
    return out


def verify_tree(scores: Tensor, trees: list[TokenTree], active: list[int], do_sample: bool):
    """(accepted node slots per row, next token per row) by the greedy or the multi-draft rule."""
    paths: list[list[int]] = [[] for _ in trees]
    nxt = [0] * len(trees)
    target = None if do_sample else scores.argmax(-1).tolist()
    probs = torch.softmax(scores.double(), -1) if do_sample else None
    for b in active:
        kids = trees[b].children()
        toks = [None] + trees[b].tokens
        slot = 0
        while True:
            if target is not None:
                want = target[b][slot]
                child = next((c for c in kids[slot] if toks[c] == want), None)
                if child is None:
                    nxt[b] = want
                    break
            else:
                child, residual = _multi_draft(probs[b, slot], [(c, toks[c]) for c in kids[slot]])
                if child is None:
                    nxt[b] = int(torch.multinomial(residual, 1))
                    break
            paths[b].append(child)
            slot = child
    return paths, nxt


def _multi_draft(p: Tensor, children: list[tuple[int, int]]) -> tuple[int | None, Tensor]:
    """Try each (slot, token) child in turn against ``p``: the accepted child, or None and the
    residual distribution to draw from."""
    p = p.clone()
    for slot, tok in children:
        total = float(p.sum())
        if total <= 0:
            break
        if float(torch.rand(())) * total < float(p[tok]):
            return slot, p
        p[tok] = 0.0
    return None, p


def tree_step(call, rows, trees: list[TokenTree | None], live: list[bool], limits: list[int], t1: float) -> None:
    """One round of the speculative loop (:mod:`.loop`) with token trees: one forward over every
    live row's root and tree, the logits processors per slot, the tree rule, the cache keeps the
    accepted paths."""
    batch = len(live)
    active = [b for b in range(batch) if live[b]]
    trees = [trees[b].pruned(limits[b]) if live[b] and trees[b] is not None else TokenTree() for b in range(batch)]
    call.ragged.retire([b for b in range(batch) if not live[b]])
    roots = [rows.gen[b][-1] if live[b] else None for b in range(batch)]
    logits = tree_extend(call.ragged, roots, trees).to(torch.float32)
    width = logits.shape[1]
    scores = tree_scores(call, logits, rows, trees, active)
    paths, nxt = verify_tree(scores, trees, active, call.do_sample)
    if call.reader is not None:
        call.reader.observe_window([[roots[b], *trees[b].tokens] if live[b] else [] for b in range(batch)],
                                   scores.argmax(-1).tolist(), [[-1, *(p + 1 for p in t.parents)] for t in trees])
    tree_keep(call.ragged, paths, width, [len(paths[b]) + 1 if live[b] else 0 for b in range(batch)])
    spent = time.perf_counter() - t1
    stats = call.stats
    stats.verify_seconds += spent
    call.cost.observe(width, spent)
    stats.steps += 1
    stats.row_steps += len(active)
    stats.drafted += sum(len(trees[b]) for b in active)
    stats.accepted += sum(len(paths[b]) for b in active)
    call.drafter.observe([len(t) for t in trees], [len(p) for p in paths])
    for b in active:
        rows.extend(b, [trees[b].tokens[s - 1] for s in paths[b]] + [nxt[b]])
