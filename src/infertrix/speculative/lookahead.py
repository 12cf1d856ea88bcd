"""Lookahead: multi-branch drafts retrieved from a trie of the n-grams seen so far, verified as a tree.

Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language Model with Lossless
Generation Accuracy" (Ant Group, KDD 2024, https://arxiv.org/abs/2312.12728). Every window of
``depth`` tokens of the prompts and of the outputs goes into one trie with counts; to draft, the
row's last ``prefix`` tokens (longest first, down to one) are walked from the root, and the
continuations below the match form the draft tree: nodes are taken best first by their estimated
probability of being reached (the product of count ratios along their path, scaled by how often
predictions were accepted so far), as many as maximise expected tokens per second under the
measured verification cost (:mod:`.budget`). Prompt lookup drafts one copied continuation; the
trie offers the several continuations a phrase had, and it is shared by the rows of a batch and by
the calls made while the transform is applied (outputs of earlier calls are drafts for later ones).
Bounded: past ``max_nodes`` nodes every count is halved and nodes left at zero are dropped.
Lossless through the tree verifier (:mod:`.tree`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .drafter import Draft, DraftContext, Drafter
from .state import prepared_for
from .transform import SpeculativeDecoding
from .tree import TokenTree


class NGramTrie:
    """Counts of every token window of length ``depth``: a node is ``[count, {token: node}]``."""

    def __init__(self, depth: int, max_nodes: int):
        self.depth = depth
        self.max_nodes = max_nodes
        self.root: list = [0, {}]
        self.nodes = 0

    def add(self, tokens: list[int], start: int) -> int:
        """Count the windows of ``tokens`` starting at ``start`` onwards that end inside it (a
        window reaching past the end is counted later, when its tokens exist); returns the next start."""
        last = len(tokens) - self.depth
        for i in range(start, last + 1):
            node = self.root
            for tok in tokens[i : i + self.depth]:
                kids = node[1]
                child = kids.get(tok)
                if child is None:
                    child = kids[tok] = [0, {}]
                    self.nodes += 1
                child[0] += 1
                node = child
        if self.nodes > self.max_nodes:
            self._halve(self.root)
        return max(start, last + 1)

    def _halve(self, node: list) -> None:
        """Halve every count, drop the nodes left at zero (bounded memory, recent n-grams favoured)."""
        stack = [node]
        self.nodes = 0
        while stack:
            n = stack.pop()
            for tok, child in list(n[1].items()):
                child[0] //= 2
                if child[0] == 0:
                    del n[1][tok]
                else:
                    self.nodes += 1
                    stack.append(child)

    def match(self, context: list[int], prefix: int, shortest: int = 1) -> list | None:
        """The node reached by the longest suffix of ``context`` (``shortest`` to ``prefix`` tokens)
        that has continuations, or None."""
        for m in range(min(prefix, len(context)), shortest - 1, -1):
            node = self.root
            for tok in context[-m:]:
                node = node[1].get(tok)
                if node is None:
                    break
            if node is not None and node[1]:
                return node
        return None


def grow_tree(node: list, budget: int, max_depth: int, scale: float) -> tuple[TokenTree, list[float]]:
    """Up to ``budget`` nodes below ``node``, best first by estimated reach probability (count
    ratios along the path times ``scale`` per level); returns the tree and each node's estimate."""
    tree, probs = TokenTree(), []
    heap = [(-scale * child[0] / node[0], tok, -1, 1, child) for tok, child in node[1].items()]
    heapq.heapify(heap)
    while heap and len(tree) < budget:
        neg, tok, parent, depth, child = heapq.heappop(heap)
        tree.tokens.append(tok)
        tree.parents.append(parent)
        probs.append(-neg)
        me = len(tree) - 1
        if depth < max_depth:
            for t2, gc in child[1].items():
                heapq.heappush(heap, (neg * scale * gc[0] / child[0], t2, me, depth + 1, gc))
    return tree, probs  # best first: a parent before its children, likelier siblings first


def best_size(probs: list[float], cost) -> int:
    """How many of the best-first nodes to verify: the count with the most expected tokens (1 plus
    the nodes' reach probabilities) per second of a verification that wide."""
    best_n, best = 0, 1.0 / cost.time(1)
    total = 1.0
    for n, p in enumerate(probs, start=1):
        total += p
        rate = total / cost.time(n + 1)
        if rate > best:
            best_n, best = n, rate
    return best_n


def _cut(tree: TokenTree, n: int) -> TokenTree:
    return TokenTree(tree.tokens[:n], tree.parents[:n])


class LookaheadDrafter(Drafter):
    """Feeds each row's tokens to the shared trie and drafts a tree per row from it."""

    def __init__(self, trie: NGramTrie, prefix: int, max_nodes: int, adaptive: bool):
        self.trie = trie
        self.prefix = prefix
        self.max_nodes = max_nodes
        self.adaptive = adaptive
        self.scale = 0.7  # predicted vs accepted, learnt (kept across calls through the trie owner)
        self.predicted = [0.0]

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        self.added = [0] * ctx.batch_size  # next window start per row

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        trees: list[TokenTree | None] = []
        self.predicted = []
        for b, seq in enumerate(seqs):
            self.added[b] = self.trie.add(seq, self.added[b])
            node = self.trie.match(seq, self.prefix) if limits[b] > 0 else None
            if node is None:
                trees.append(None)
                self.predicted.append(0.0)
                continue
            tree, probs = grow_tree(node, self.max_nodes, limits[b], self.scale)
            n = best_size(probs, self.ctx.cost) if self.adaptive else len(tree)
            trees.append(_cut(tree, n) if n else None)
            self.predicted.append(sum(probs[:n]))
        tokens = [t.first_branch() if t is not None else [] for t in trees]
        return Draft(tokens, trees=trees if any(tokens) else None)

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        """Move the per-level scale towards accepted / predicted path length."""
        pred = sum(p for p, d in zip(self.predicted, drafted, strict=False) if d)
        got = sum(a for a, d in zip(accepted, drafted, strict=True) if d)
        if pred > 0:
            ratio = min(max(got / pred, 0.25), 2.0)
            self.scale = min(max(self.scale * ratio ** 0.2, 0.05), 1.0)


@dataclass
class LookaheadMemory:
    """What one applied :class:`Lookahead` keeps across calls: the trie and the learnt scale."""

    trie: NGramTrie
    scale: float = 0.7


@register_transform("lookahead")
@dataclass
class Lookahead(SpeculativeDecoding):
    """Lookahead (Zhao et al. 2023, https://arxiv.org/abs/2312.12728): multi-branch drafts from a
    trie of the n-grams of prompts and outputs, verified as a token tree in one forward. Lossless;
    no draft model; memory bounded by ``max_trie_nodes``.

    Fields:
      max_nodes: most draft nodes per row and step (the measured cost decides how many are used).
      depth: tokens per trie window (matched prefix plus continuation).
      prefix: longest suffix of the row matched in the trie.
      max_trie_nodes: trie size past which counts are halved and rare n-grams dropped.
      shared: keep the trie across the calls made while applied (earlier outputs draft later
        calls); False starts each call from its prompt alone.
      adaptive: verify the number of nodes with the most expected tokens per second; False: all.
    """
    use_when = "repetitive or templated outputs, repeated queries, copies from the prompt: lossless, no draft model"

    primary = "max_nodes"
    max_nodes: int = 24
    depth: int = 10
    prefix: int = 3
    max_trie_nodes: int = 200_000
    shared: bool = True
    adaptive: bool = True

    def validate(self) -> None:
        if self.max_nodes < 1:
            raise ConfigError(f"Lookahead needs max_nodes >= 1, got {self.max_nodes}")
        if not 1 <= self.prefix < self.depth:
            raise ConfigError(f"Lookahead needs 1 <= prefix < depth, got prefix={self.prefix}, depth={self.depth}")
        if self.max_trie_nodes < 1000:
            raise ConfigError(f"Lookahead max_trie_nodes must be >= 1000, got {self.max_trie_nodes}")

    def _memory(self, model: nn.Module) -> LookaheadMemory:
        """The trie for ``model``, kept in its run-time record while applied (earlier outputs are
        what later calls draft from)."""
        return prepared_for(model, self, lambda: LookaheadMemory(NGramTrie(self.depth, self.max_trie_nodes)))

    def drafter_report(self, model: nn.Module) -> dict[str, object]:
        mem = self._memory(model)
        return {"trie nodes": mem.trie.nodes, "reach scale": round(mem.scale, 3)}

    def make_drafter(self, model: nn.Module) -> Drafter:
        mem = self._memory(model) if self.shared else LookaheadMemory(NGramTrie(self.depth, self.max_trie_nodes))
        return _Remembering(mem, self.prefix, self.max_nodes, self.adaptive)


class _Remembering(LookaheadDrafter):
    """A drafter whose learnt scale is written back to the memory it came from."""

    def __init__(self, mem: LookaheadMemory, prefix: int, max_nodes: int, adaptive: bool):
        super().__init__(mem.trie, prefix, max_nodes, adaptive)
        self.mem = mem
        self.scale = mem.scale

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        super().observe(drafted, accepted)
        self.mem.scale = self.scale
