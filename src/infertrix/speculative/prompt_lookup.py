"""Prompt lookup / CopySpec: draft by copying what followed the last n tokens earlier in the text.

Saxena, "Prompt Lookup Decoding" (2023, https://github.com/apoorvumang/prompt-lookup-decoding);
Dumitru et al., "CopySpec: Accelerating LLMs with Speculative Copy-and-Paste Without
Compromising Quality" (2025, https://arxiv.org/abs/2502.08923). No draft model: the draft is the
continuation of the most recent earlier occurrence of the row's last ``n`` tokens (longest ``n``
first, from ``max_ngram`` down to ``min_ngram``), found through the incremental hash index
``infertrix::ngram_index_update`` / ``infertrix::ngram_lookup`` (C++ kernel, O(new tokens) per
step). Lossless (the verifier keeps the target's output exactly); pays off where the output
repeats its input (rewriting, summarising, editing code, quoting), costs little elsewhere
(a failed lookup drafts nothing and the step is plain decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from ..ops.ngram_index import ngram_index_update, ngram_lookup
from .budget import AcceptanceRate, best_length
from .drafter import Draft, DraftContext, Drafter
from .transform import SpeculativeDecoding


class PromptLookupDrafter(Drafter):
    """Keeps each row's tokens in a growing int64 buffer and one n-gram index per n next to it.

    One index per n (rather than one lookup that falls back from the longest n) tells which n
    matched, and the acceptance of copies is tracked per matched n: a 1-gram match is a guess, a
    3-gram match usually a real copy. With ``adaptive`` the draft length is the one with the most
    expected tokens per second (:func:`~.budget.best_length`) under the measured verification
    cost, which is 0 (a plain step) when a match is not worth verifying."""

    def __init__(self, num_tokens: int, min_ngram: int, max_ngram: int, table_bits: int, adaptive: bool):
        self.num_tokens = num_tokens
        self.sizes = list(range(max_ngram, min_ngram - 1, -1))  # longest first
        self.table_bits = table_bits
        self.adaptive = adaptive

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        b = ctx.batch_size
        self.tables = {n: torch.full((b, 1, 1 << self.table_bits), -1, dtype=torch.int64) for n in self.sizes}
        self.indexed = {n: torch.zeros(b, dtype=torch.int64) for n in self.sizes}
        self.tokens = torch.zeros((b, 256), dtype=torch.int64)
        self.lengths = torch.zeros(b, dtype=torch.int64)
        self.have = [0] * b
        self.rates = {n: AcceptanceRate() for n in self.sizes}
        self.matched: list[int | None] = [None] * b

    def _append(self, seqs: list[list[int]]) -> None:
        need = max(len(s) for s in seqs)
        if need > self.tokens.shape[1]:
            grown = torch.zeros((self.tokens.shape[0], max(need, 2 * self.tokens.shape[1])), dtype=torch.int64)
            grown[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = grown
        for b, s in enumerate(seqs):  # verified tokens only ever grow: write the new ones
            if len(s) > self.have[b]:
                self.tokens[b, self.have[b] : len(s)] = torch.tensor(s[self.have[b] :], dtype=torch.int64)
                self.have[b] = len(s)
        self.lengths = torch.tensor(self.have, dtype=torch.int64)

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        batch = len(seqs)
        self.matched = [None] * batch
        k = min(self.num_tokens, max(limits))
        if k <= 0:
            return Draft([[] for _ in seqs])
        self._append(seqs)
        found: list[list[int]] = [[] for _ in range(batch)]
        for n in self.sizes:
            ngram_index_update(self.tables[n], self.tokens, self.lengths, self.indexed[n], n)
            if all(found[b] or limits[b] <= 0 for b in range(batch)):
                continue
            out, counts = ngram_lookup(self.tables[n], self.tokens, self.lengths, n, k)
            counts = counts.tolist()
            rows = None
            for b in range(batch):
                if not found[b] and limits[b] > 0 and counts[b] > 0:
                    rows = out.tolist() if rows is None else rows
                    found[b] = rows[b][: min(counts[b], limits[b])]
                    self.matched[b] = n
        if self.adaptive:
            live = [b for b in range(batch) if limits[b] > 0]
            rates = [self.rates[self.matched[b]].rate if found[b] else None for b in live]
            k = best_length(rates, [len(found[b]) for b in live], self.ctx.cost)
        return Draft([f[:k] for f in found])

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        for b, (d, a) in enumerate(zip(drafted, accepted, strict=True)):
            if d > 0 and self.matched[b] is not None:
                self.rates[self.matched[b]].update(d, a)


@register_transform("prompt_lookup", "pld", "copyspec")
@dataclass
class PromptLookup(SpeculativeDecoding):
    """Prompt lookup / CopySpec n-gram drafting (Saxena 2023; Dumitru et al. 2025,
    https://arxiv.org/abs/2502.08923). Lossless; no draft model, no extra memory beyond a small
    hash table per row; fastest on outputs that copy their input.

    Fields:
      num_tokens: most tokens drafted per step (a shorter match drafts fewer).
      min_ngram, max_ngram: n-gram sizes matched, longest first.
      adaptive: draft the length with the most expected tokens per second, from the measured
        acceptance of copies (per matched n-gram size) and the measured cost of a verification
        forward per width (:mod:`~.budget`); 0 tokens, a plain step, when a match is not worth
        verifying. False: always draft the whole match, up to ``num_tokens``.
      table_bits: log2 of the hash-table slots per row and n-gram size.
    """
    use_when = "outputs copy from the prompt (rewrite, edit, extract, code changes): lossless, no draft model"

    primary = "num_tokens"
    num_tokens: int = 10
    min_ngram: int = 1
    max_ngram: int = 4
    adaptive: bool = True
    table_bits: int = 14

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"PromptLookup needs num_tokens >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(
                f"PromptLookup needs 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                f"max_ngram={self.max_ngram}"
            )
        if not 4 <= self.table_bits <= 24:
            raise ConfigError(f"PromptLookup table_bits must be in [4, 24], got {self.table_bits}")

    def make_drafter(self, model: nn.Module) -> Drafter:
        return PromptLookupDrafter(self.num_tokens, self.min_ngram, self.max_ngram, self.table_bits, self.adaptive)
