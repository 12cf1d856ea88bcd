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
from .drafter import AdaptiveLength, Draft, DraftContext, Drafter
from .transform import SpeculativeDecoding


class PromptLookupDrafter(Drafter):
    """Keeps each row's tokens in a growing int64 buffer and the n-gram index next to it."""

    def __init__(
        self, num_tokens: int, min_ngram: int, max_ngram: int, table_bits: int, adaptive: bool, max_step_tokens: int
    ):
        self.max_step_tokens = max_step_tokens
        self.length = AdaptiveLength(num_tokens, maximum=max(num_tokens, 1) * 2) if adaptive else None
        self.num_tokens = num_tokens
        self.min_ngram, self.max_ngram, self.table_bits = min_ngram, max_ngram, table_bits

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        b = ctx.batch_size
        self.table = torch.full((b, self.max_ngram - self.min_ngram + 1, 1 << self.table_bits), -1, dtype=torch.int64)
        self.tokens = torch.zeros((b, 256), dtype=torch.int64)
        self.lengths = torch.zeros(b, dtype=torch.int64)
        self.indexed = torch.zeros(b, dtype=torch.int64)

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        need = max(len(s) for s in seqs)
        if need > self.tokens.shape[1]:
            grown = torch.zeros((self.tokens.shape[0], max(need, 2 * self.tokens.shape[1])), dtype=torch.int64)
            grown[:, : self.tokens.shape[1]] = self.tokens
            self.tokens = grown
        for b, s in enumerate(seqs):  # verified tokens only ever grow: write the new ones
            have = int(self.lengths[b])
            if len(s) > have:
                self.tokens[b, have : len(s)] = torch.tensor(s[have:], dtype=torch.int64)
                self.lengths[b] = len(s)
        k = self.length.length if self.length else self.num_tokens
        k = min(k, max(limits))
        # every row of the batch pays for the longest draft: bound batch x (1 + k)
        rows = sum(1 for lim in limits if lim > 0)
        if rows:
            k = min(k, max(1, self.max_step_tokens // rows - 1))
        if k <= 0:
            return Draft([[] for _ in seqs])
        ngram_index_update(self.table, self.tokens, self.lengths, self.indexed, self.min_ngram)
        out, counts = ngram_lookup(self.table, self.tokens, self.lengths, self.min_ngram, k)
        rows = out.tolist()
        return Draft([rows[b][: min(int(c), limits[b])] for b, c in enumerate(counts.tolist())])

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        if self.length:
            self.length.update(drafted, accepted)


@register_transform("prompt_lookup", "pld", "copyspec")
@dataclass
class PromptLookup(SpeculativeDecoding):
    """Prompt lookup / CopySpec n-gram drafting (Saxena 2023; Dumitru et al. 2025,
    https://arxiv.org/abs/2502.08923). Lossless; no draft model, no extra memory beyond a small
    hash table per row; fastest on outputs that copy their input.

    Fields:
      num_tokens: tokens drafted per step (at most; a shorter match drafts fewer).
      min_ngram, max_ngram: n-gram sizes matched, longest first.
      adaptive: grow the draft after fully accepted steps and shrink it after rejections
        (up to 2 x num_tokens).
      table_bits: log2 of the hash-table slots per row and n-gram size.
      max_step_tokens: bound on batch x (1 + draft length) per verification, since every row
        computes as many positions as the longest draft (on a CPU, compute starts to cost beyond
        a few dozen positions); batch 1 drafts up to num_tokens, batch 4 up to 5 by default.
    """

    primary = "num_tokens"
    num_tokens: int = 10
    min_ngram: int = 1
    max_ngram: int = 3
    adaptive: bool = False
    table_bits: int = 14
    max_step_tokens: int = 24

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"PromptLookup needs num_tokens >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(
                f"PromptLookup needs 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                f"max_ngram={self.max_ngram}"
            )
        if self.max_step_tokens < 2:
            raise ConfigError(f"PromptLookup max_step_tokens must be >= 2, got {self.max_step_tokens}")
        if not 4 <= self.table_bits <= 24:
            raise ConfigError(f"PromptLookup table_bits must be in [4, 24], got {self.table_bits}")

    def make_drafter(self, model: nn.Module) -> Drafter:
        return PromptLookupDrafter(
            self.num_tokens, self.min_ngram, self.max_ngram, self.table_bits, self.adaptive, self.max_step_tokens
        )
