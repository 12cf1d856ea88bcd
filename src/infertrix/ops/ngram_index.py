"""``infertrix::ngram_index_update`` / ``infertrix::ngram_lookup``: the n-gram index of prompt lookup.

Prompt lookup decoding (Saxena 2023, https://github.com/apoorvumang/prompt-lookup-decoding) and
CopySpec (Dumitru et al. 2025, https://arxiv.org/abs/2502.08923) draft the tokens that followed
the most recent earlier occurrence of the sequence's last n tokens. Rescanning the whole text for
that n-gram at every step costs O(length) per step; this index keeps, per row and per n-gram size,
a hash table ``hash(last n tokens) -> end position of their latest occurrence`` that is updated
only with the tokens added since the previous step, so a step costs O(new tokens + max_n).

Layout (all int64 tensors, one row per sequence of the batch):
  - ``table [B, G, H]``: slot -> end position of an n-gram (``-1`` empty); ``G = max_n - min_n + 1``
    sizes ``n = min_n + g``; ``H`` a power of two.
  - ``tokens [B, T]`` with ``lengths [B]`` valid tokens per row (the rest is ignored).
  - ``indexed [B]``: how many n-gram end positions are already in the table (the update indexes
    end positions ``indexed .. lengths - 2``, i.e. every n-gram that has a continuation token).
Hash: FNV-1a over the token ids in 64-bit unsigned arithmetic, slot ``(h ^ (h >> 32)) & (H - 1)``.
A slot keeps the latest n-gram written to it; a lookup verifies the tokens at the stored position
so a hash collision can only lose a match, never return a wrong one. Longer n-grams are tried
first. The compiled kernel (``csrc/cpu/ngram_index.cpp``) gives exactly these results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_op

_MASK = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def _slot(ngram: list[int], size: int) -> int:
    h = _FNV_OFFSET
    for t in ngram:
        h = ((h ^ (t & _MASK)) * _FNV_PRIME) & _MASK
    return (h ^ (h >> 32)) & (size - 1)


def _check(table: Tensor, tokens: Tensor, lengths: Tensor, min_n: int) -> None:
    if table.dim() != 3 or tokens.dim() != 2 or lengths.dim() != 1:
        raise ValueError("ngram index expects table [B, G, H], tokens [B, T] and lengths [B]")
    if not (table.shape[0] == tokens.shape[0] == lengths.shape[0]):
        raise ValueError(
            f"ngram index: batch sizes differ (table {table.shape[0]}, tokens {tokens.shape[0]}, "
            f"lengths {lengths.shape[0]})"
        )
    size = table.shape[2]
    if size <= 0 or size & (size - 1):
        raise ValueError(f"ngram index: the table's last dimension must be a power of two, got {size}")
    if min_n < 1:
        raise ValueError(f"ngram index: min_n must be >= 1, got {min_n}")
    for t in (table, tokens, lengths):
        if t.dtype != torch.int64:
            raise TypeError(f"ngram index: expected int64 tensors, got {t.dtype}")
    if lengths.numel() and int(lengths.max()) > tokens.shape[1]:
        raise ValueError("ngram index: a length exceeds the tokens tensor's width")


def ngram_index_update_reference(
    table: Tensor, tokens: Tensor, lengths: Tensor, indexed: Tensor, min_n: int
) -> None:
    """Add the n-grams ending at positions ``indexed .. lengths - 2`` of each row (in place)."""
    _check(table, tokens, lengths, min_n)
    groups, size = table.shape[1], table.shape[2]
    for b in range(tokens.shape[0]):
        length = int(lengths[b])
        start = int(indexed[b])
        if start >= length - 1:
            continue
        row = tokens[b, :length].tolist()
        for i in range(start, length - 1):
            for g in range(groups):
                n = min_n + g
                if i >= n - 1:
                    table[b, g, _slot(row[i - n + 1 : i + 1], size)] = i
        indexed[b] = length - 1


def ngram_lookup_reference(
    table: Tensor, tokens: Tensor, lengths: Tensor, min_n: int, num_tokens: int
) -> tuple[Tensor, Tensor]:
    """Draft up to ``num_tokens`` tokens per row: (drafts [B, num_tokens] int64, counts [B] int64)."""
    _check(table, tokens, lengths, min_n)
    batch, groups, size = table.shape
    out = torch.zeros(batch, num_tokens, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        length = int(lengths[b])
        for g in range(groups - 1, -1, -1):
            n = min_n + g
            if length < n + 1:
                continue
            row = tokens[b, :length].tolist()
            query = row[length - n :]
            p = int(table[b, g, _slot(query, size)])
            if p < n - 1 or p > length - 2 or row[p - n + 1 : p + 1] != query:
                continue
            m = min(num_tokens, length - 1 - p)
            if m > 0:
                out[b, :m] = torch.tensor(row[p + 1 : p + 1 + m], dtype=torch.int64)
            counts[b] = m
            break
    return out.to(tokens.device), counts.to(tokens.device)


@torch.library.custom_op("infertrix::ngram_index_update", mutates_args=("table", "indexed"))
def ngram_index_update(
    table: Tensor, tokens: Tensor, lengths: Tensor, indexed: Tensor, min_n: int
) -> None:
    ngram_index_update_reference(table, tokens, lengths, indexed, min_n)


@ngram_index_update.register_fake
def _(table: Tensor, tokens: Tensor, lengths: Tensor, indexed: Tensor, min_n: int) -> None:
    return None


@torch.library.custom_op("infertrix::ngram_lookup", mutates_args=())
def ngram_lookup(
    table: Tensor, tokens: Tensor, lengths: Tensor, min_n: int, num_tokens: int
) -> tuple[Tensor, Tensor]:
    return ngram_lookup_reference(table, tokens, lengths, min_n, num_tokens)


@ngram_lookup.register_fake
def _(table: Tensor, tokens: Tensor, lengths: Tensor, min_n: int, num_tokens: int):
    batch = table.shape[0]
    return (
        tokens.new_empty((batch, num_tokens), dtype=torch.int64),
        tokens.new_empty((batch,), dtype=torch.int64),
    )


register_op("ngram_index_update", ngram_index_update_reference)
register_op("ngram_lookup", ngram_lookup_reference)
