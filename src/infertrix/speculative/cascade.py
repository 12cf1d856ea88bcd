"""Cascade drafting: the quantized self-draft, itself drafted and extended by an n-gram model.

Chen et al., "Cascade Speculative Drafting for Even Faster LLM Inference" (2023,
https://arxiv.org/abs/2312.11462) chain drafters of falling cost:

- **Vertical cascade**: the draft is itself drafted. Here the model's quantized copy
  (:class:`~.quantized_self.QuantizedSelf`, drafting on the model's KV cache) checks guesses from a
  statistical n-gram model of the prompt and the outputs (:class:`~.lookahead.NGramTrie`, the
  "statistical language model" at the bottom of the paper's cascade) the way a target checks a
  draft: one draft forward over ``[token, guesses...]`` gives the draft's argmax at every position,
  and the guesses are kept while they equal it. The draft tokens are exactly the draft's own
  greedy tokens, made with fewer draft forwards when the guesses are right.
- **Horizontal cascade**: later draft positions are less likely to be accepted, so they go to the
  cheapest drafter: after the draft model stops (its length, or its confidence below
  ``confidence``), the n-gram model continues for up to ``tail`` tokens, which cost only
  verification width.

The vertical part runs greedy drafts at batch 1 on the shared cache (at batch > 1 rows keeping
different numbers of guesses would move apart in the shared cache; under sampling the draft
samples one token per forward, as :class:`~.quantized_self.QuantizedSelf`); elsewhere the draft
forwards are one token each and only the tail is added. Lossless: the model verifies every token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .draft_model import DraftModelDrafter
from .drafter import Draft, DraftContext, Drafter
from .lookahead import NGramTrie
from .quantized_self import QuantizedSelf
from .shared import held_state, restore_shared

MIN_MATCH = 2  # context tokens an n-gram guess must match (a 1-token match is mostly noise)


def continuation(trie: NGramTrie, context: list[int], prefix: int, most: int) -> list[int]:
    """The trie's most counted continuation (up to ``most`` tokens) of the longest suffix of
    ``context`` of ``MIN_MATCH`` to ``prefix`` tokens that it has seen followed by something."""
    node = trie.match(context, prefix, MIN_MATCH) if most > 0 else None
    out: list[int] = []
    while node is not None and node[1] and len(out) < most:
        tok, node = max(node[1].items(), key=lambda kv: kv[1][0])
        out.append(tok)
    return out


class CascadeDrafter(DraftModelDrafter):
    """:class:`~.draft_model.DraftModelDrafter` on the model's cache, with n-gram guesses checked
    per draft forward (vertical) and an n-gram tail after the draft stops (horizontal)."""

    def __init__(self, draft: nn.Module, cascade: Cascade):
        super().__init__(draft, cascade.num_tokens, cascade.confidence, cascade.adaptive, cascade.max_tokens,
                         share=True)
        self.guess, self.tail, self.prefix = cascade.guess, cascade.tail, cascade.prefix
        self.trie_depth, self.trie_nodes = cascade.prefix + max(cascade.guess, cascade.tail, 1), cascade.max_trie_nodes
        self.guessed = self.kept_guesses = 0  # vertical guesses offered / equal to the draft's own token
        self.tail_tokens = 0
        self.forwards = self.vertical_tokens = 0  # draft forwards of the vertical cascade, tokens they drafted

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        self.trie = NGramTrie(self.trie_depth, self.trie_nodes)
        self.added = [0] * ctx.batch_size

    @torch.no_grad()
    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        for b, seq in enumerate(seqs):
            self.added[b] = self.trie.add(seq, self.added[b])
        draft = super().propose(seqs, limits)
        if self.tail <= 0 or self.ctx.do_sample:
            return draft
        for b, toks in enumerate(draft.tokens):
            if toks:
                extra = continuation(self.trie, seqs[b] + toks, self.prefix, min(self.tail, limits[b] - len(toks)))
                toks.extend(extra)
                self.tail_tokens += len(extra)
        return draft

    def _propose_shared(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        if len(seqs) > 1 or self.ctx.do_sample or self.guess <= 0:
            return super()._propose_shared(seqs, limits)
        kv, forward = self.shared
        want = min(self.length(limits), limits[0])
        if want <= 0:
            return self._nothing(1)
        held = held_state(kv)
        try:
            with kv.forward_with(forward):
                return Draft([self._vertical(kv, seqs[0], want)])
        finally:
            restore_shared(kv, held)

    def _vertical(self, kv, seq: list[int], want: int) -> list[int]:
        """Up to ``want`` greedy draft tokens for one row, each draft forward also checking the
        n-gram model's guesses for the tokens after it."""
        tokens: list[int] = []
        feed = [seq[-1]]
        while len(tokens) < want:
            guesses = continuation(self.trie, seq + tokens, self.prefix, min(self.guess, want - len(tokens) - 1))
            t0 = time.perf_counter()
            logits = kv.extend([feed + guesses])[0, : 1 + len(guesses)].to(torch.float32)
            probs = torch.softmax(logits, -1)
            conf, best = probs.max(-1)
            got, stop = [], False
            for j in range(1 + len(guesses)):  # position j predicts the token after guess j - 1
                got.append(int(best[j]))
                if float(conf[j]) < self.confidence:
                    stop = True
                if stop or len(tokens) + len(got) >= want or j == len(guesses) or guesses[j] != got[-1]:
                    break
            self.note_token_seconds((time.perf_counter() - t0) / len(got))  # a draft token's cost, guesses included
            self.guessed += len(guesses)
            self.kept_guesses += len(got) - 1
            kv.keep_fed([len(got)])  # the fed token and the guesses the draft agreed with
            self.forwards += 1
            self.vertical_tokens += len(got)
            tokens.extend(got)
            feed = [got[-1]]
            if stop:
                break
        return tokens


@register_transform("cascade")
@dataclass
class Cascade(QuantizedSelf):
    """Cascade drafting (Chen et al. 2023, https://arxiv.org/abs/2312.11462): the model's quantized
    self-draft (:class:`QuantizedSelf`, W8A8 by default) checks an n-gram model's guesses in each of
    its forwards (vertical cascade) and the n-gram model extends its draft (horizontal). Lossless.

    Fields (besides :class:`QuantizedSelf`'s):
      guess: n-gram guesses checked per draft forward (0: no vertical cascade).
      tail: n-gram tokens added after the draft stops (0: no horizontal cascade).
      prefix: longest context suffix matched in the n-gram model (at least 2 tokens must match).
      max_trie_nodes: n-gram model size past which counts are halved.
    """
    use_when = "like quantized_self, on text that repeats itself: the n-gram model saves draft forwards"

    bench_recipe: ClassVar[str | None] = "cascade"
    guess: int = 8
    tail: int = 2
    prefix: int = 3
    max_trie_nodes: int = 100_000

    def validate(self) -> None:
        super().validate()
        if self.guess < 0 or self.tail < 0:
            raise ConfigError(f"Cascade needs guess >= 0 and tail >= 0, got guess={self.guess}, tail={self.tail}")
        if self.prefix < 2:
            raise ConfigError(f"Cascade needs prefix >= 2 (n-grams match at least 2 tokens), got {self.prefix}")
        if self.max_trie_nodes < 1000:
            raise ConfigError(f"Cascade max_trie_nodes must be >= 1000, got {self.max_trie_nodes}")
        if not self.shared_cache:
            raise ConfigError("Cascade drafts on the model's KV cache; shared_cache=false is quantized_self's option")

    def make_drafter(self, model: nn.Module) -> Drafter:
        return CascadeDrafter(self.draft_for(model), self)
