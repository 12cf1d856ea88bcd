"""Jacobi lookahead: drafts from n-grams harvested from the model's own parallel Jacobi iterations.

Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding" (ICML 2024,
https://arxiv.org/abs/2402.02057), after Jacobi decoding (Santilli et al. 2023,
https://arxiv.org/abs/2305.10427): guesses for the next positions are fed beside the real token;
the model's output at each guessed position, given the guesses before it, is one Jacobi update,
and a guess followed by the model's output forms an n-gram the model is likely to produce later.
Fu et al. run a separate 2-D lookahead branch (W positions x N-1 past iterations) and a
verification branch of G pool candidates in one forward. Here both share the verification window
the loop already runs: each row's draft is a token tree of pool continuations (the row's last
tokens matched in the pool, longest first, best first by count, as many as pay under the
measured verification cost; :mod:`.lookahead`'s machinery) whose first branch is extended by a
Jacobi tail of ``window`` guesses, namely the model's outputs of the previous window beyond the
point it accepted (position by position, as in Jacobi decoding), then continued from the pool.
After the forward, the model's argmax at *every* slot, accepted or not, and the ``ngram - 1``
tokens that led to it go into the pool (:meth:`~.drafter.Drafter.observe_window`), and the
outputs along the first branch become the next guesses. The tail is fed for its harvest even
when nothing in it is accepted, so it costs verification width every step: the never-slower
guard (:mod:`.gain`) measures whether the whole pays.

Lossless through the shared verifiers (linear or tree). Memory: the pool, an :class:`NGramTrie`
bounded by ``max_pool`` nodes (counts halved past it). On the decode engine's cache trees are not
verified, so the first branch (pool continuation then Jacobi tail) is verified as a linear draft.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .drafter import Draft, DraftContext, Drafter
from .lookahead import NGramTrie, best_size, grow_tree
from .state import prepared_for
from .transform import SpeculativeDecoding
from .tree import TokenTree


@dataclass
class JacobiMemory:
    """What one applied :class:`Jacobi` keeps across calls: the n-gram pool and the learnt scale."""

    pool: NGramTrie
    scale: float = 0.7


def spine_end(tree: TokenTree) -> int:
    """The node ending the tree's first branch (-1: the root, an empty tree)."""
    kids, slot = tree.children(), 0
    while kids[slot]:
        slot = kids[slot][0]
    return slot - 1


class JacobiDrafter(Drafter):
    """Drafts pool continuations plus a Jacobi tail per row; harvests every verified slot's argmax."""

    reads_window = True

    def __init__(self, mem: JacobiMemory, window: int, ngram: int, max_nodes: int, prompt_ngrams: bool,
                 adaptive: bool):
        self.mem = mem
        self.pool = mem.pool
        self.window = window
        self.ngram = ngram
        self.max_nodes = max_nodes
        self.prompt_ngrams = prompt_ngrams
        self.adaptive = adaptive
        self.prefix = max(1, ngram - 2)  # pool matches leave at least two tokens of continuation
        self.rng = random.Random(0)

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        b = ctx.batch_size
        self.seeded = [False] * b
        self.outs: list[list[int]] = [[] for _ in range(b)]  # argmax along the last first branch
        self.out_base = [0] * b  # outs[d] is the guess for position out_base + d
        self.fresh = [False] * b  # proposed by us since the last window (a guard's plain step is not)
        self.base = [0] * b
        self.before: list[list[int]] = [[] for _ in range(b)]  # the tokens before the root
        self.spine: list[list[int]] = [[] for _ in range(b)]
        self.pool_depth = [0] * b
        self.predicted = [0.0] * b

    def guesses(self, b: int, length: int) -> list[int]:
        """Row b's Jacobi guesses for positions ``length``, ``length + 1``...: the previous window's
        outputs at those positions (computed from guesses, so perhaps wrong)."""
        shift = length - self.out_base[b]
        return self.outs[b][shift:] if shift > 0 else []

    def extend_tail(self, b: int, seq: list[int], tree: TokenTree, limit: int) -> list[int]:
        """Append up to ``window`` tokens below the first branch: the Jacobi guesses for those
        positions, then the pool's most counted continuation, else a random token of the row (the
        start of a Jacobi iteration). Returns the first branch."""
        spine = tree.first_branch()
        guess = self.guesses(b, len(seq))
        parent = spine_end(tree)
        for _ in range(min(self.window, limit - len(spine))):
            d = len(spine)
            node = None if d < len(guess) else self.pool.match(seq[-self.ngram :] + spine, self.ngram - 1)
            if d < len(guess):
                tok = guess[d]
            elif node is not None:
                tok = max(node[1].items(), key=lambda kv: kv[1][0])[0]
            else:  # nothing known yet: a prompt token, as Jacobi iterations start from
                tok = seq[self.rng.randrange(len(seq))]
            tree.tokens.append(tok)
            tree.parents.append(parent)
            parent = len(tree) - 1
            spine.append(tok)
        return spine

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        trees: list[TokenTree | None] = []
        for b, seq in enumerate(seqs):
            if self.prompt_ngrams and not self.seeded[b]:
                self.pool.add(seq, 0)  # the prompt's own n-grams seed the pool
                self.seeded[b] = True
            tree, probs = TokenTree(), []
            node = self.pool.match(seq, self.prefix) if limits[b] > 0 else None
            if node is not None:
                tree, probs = grow_tree(node, self.max_nodes, limits[b], self.mem.scale)
                n = best_size(probs, self.ctx.cost) if self.adaptive else len(tree)
                tree, probs = TokenTree(tree.tokens[:n], tree.parents[:n]), probs[:n]
            self.pool_depth[b] = len(tree.first_branch())
            self.predicted[b] = sum(probs)
            spine = self.extend_tail(b, seq, tree, limits[b]) if limits[b] > 0 else []
            self.fresh[b], self.base[b], self.spine[b] = True, len(seq), spine
            self.before[b] = seq[max(len(seq) - self.ngram, 0) : -1]
            trees.append(tree if len(tree) else None)
        tokens = [t.first_branch() if t is not None else [] for t in trees]
        branching = any(t is not None and len(t) > len(s) for t, s in zip(trees, tokens, strict=True))
        return Draft(tokens, trees=trees if branching else None)

    def observe_window(self, fed: list[list[int]], argmax: list[list[int]], parents: list[list[int]] | None) -> None:
        """Harvest (the ``ngram - 1`` tokens up to each slot, the model's argmax there) into the pool;
        keep the argmax along the first branch as the next Jacobi guesses."""
        keep = self.ngram - 1
        for b, row in enumerate(fed):
            if not row or not self.fresh[b]:
                continue
            self.fresh[b] = False
            par = parents[b] if parents is not None else list(range(-1, len(row) - 1))
            tails: list[list[int]] = []
            for s, tok in enumerate(row):
                tail = (tails[par[s]] if s else self.before[b]) + [tok]
                tails.append(tail[-keep:])
                if len(tails[s]) == keep:
                    self.pool.add(tails[s] + [argmax[b][s]], 0)
            self.outs[b], self.out_base[b] = self.spine_outputs(row, par, argmax[b], self.spine[b]), self.base[b]

    @staticmethod
    def spine_outputs(row: list[int], par: list[int], argmax: list[int], spine: list[int]) -> list[int]:
        """The argmax at the root and at each fed slot of the first branch, by depth."""
        kids: list[list[int]] = [[] for _ in row]
        for s in range(1, len(row)):
            kids[par[s]].append(s)
        slot, outs = 0, [argmax[0]]
        for tok in spine:
            slot = next((c for c in kids[slot] if row[c] == tok), -1)
            if slot < 0:
                break
            outs.append(argmax[slot])
        return outs

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        """Move the pool's per-level scale towards accepted / predicted (pool part of the draft)."""
        pairs = [(p, min(a, k)) for p, a, k, d in zip(self.predicted, accepted, self.pool_depth, drafted, strict=False)
                 if d and p > 0]
        pred, got = sum(p for p, _ in pairs), sum(g for _, g in pairs)
        if pred > 0:
            ratio = min(max(got / pred, 0.25), 2.0)
            self.mem.scale = min(max(self.mem.scale * ratio ** 0.2, 0.05), 1.0)


@register_transform("jacobi", "lookahead_decoding")
@dataclass
class Jacobi(SpeculativeDecoding):
    """Jacobi lookahead decoding (Fu et al. 2024, https://arxiv.org/abs/2402.02057): drafts from a
    pool of n-grams harvested from the model's own Jacobi iterations on a tail of guessed positions
    fed with every verification. Lossless; no draft model; memory bounded by ``max_pool``; costs
    ``window`` extra positions per verification forward.

    Fields:
      window: Jacobi guesses fed after each draft (W); 0 harvests the drafted slots only.
      ngram: n-gram size (N): ``ngram - 1`` tokens of context and the model's output.
      max_nodes: most pool nodes per row and step (the verification branch, G; the measured
        cost decides how many are used when ``adaptive``).
      max_pool: pool size (trie nodes) past which counts are halved and rare n-grams dropped.
      prompt_ngrams: seed the pool with the prompt's n-grams (copies, as prompt lookup drafts).
      shared: keep the pool across the calls made while applied.
      adaptive: verify the number of pool nodes with the most expected tokens per second, behind
        the never-slower guard; False: all, always.
    """
    use_when = "open-ended text without a draft model, where the model's short phrases recur: lossless"

    primary = "window"
    window: int = 1
    ngram: int = 3
    max_nodes: int = 8
    max_pool: int = 100_000
    prompt_ngrams: bool = True
    shared: bool = True
    adaptive: bool = True

    def validate(self) -> None:
        if self.window < 0:
            raise ConfigError(f"Jacobi needs window >= 0, got {self.window}")
        if self.ngram < 2:
            raise ConfigError(f"Jacobi needs ngram >= 2 (one token of context and the model's output), got {self.ngram}")
        if self.max_nodes < 1:
            raise ConfigError(f"Jacobi needs max_nodes >= 1, got {self.max_nodes}")
        if self.max_pool < 64:
            raise ConfigError(f"Jacobi max_pool must be >= 64, got {self.max_pool}")

    def _new_memory(self) -> JacobiMemory:
        return JacobiMemory(NGramTrie(self.ngram, self.max_pool))

    def _memory(self, model: nn.Module) -> JacobiMemory:
        return prepared_for(model, self, self._new_memory)

    def drafter_report(self, model: nn.Module) -> dict[str, object]:
        mem = self._memory(model)
        return {"pool nodes": mem.pool.nodes, "reach scale": round(mem.scale, 3)}

    def make_drafter(self, model: nn.Module) -> Drafter:
        mem = self._memory(model) if self.shared else self._new_memory()
        return JacobiDrafter(mem, self.window, self.ngram, self.max_nodes, self.prompt_ngrams, self.adaptive)
