"""infertrix::ngram_index_update / ngram_lookup: compiled kernel against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from conftest import available_isas

from infertrix import ops
from infertrix.ops.ngram_index import (
    ngram_index_update,
    ngram_index_update_reference,
    ngram_lookup,
    ngram_lookup_reference,
)


def test_compiled_kernel_is_registered():
    if not available_isas():
        pytest.skip("infertrix._C not built")
    assert ops.status()["ngram_lookup"]["cpu"].startswith("c++")
    assert ops.status()["ngram_index_update"]["cpu"].startswith("c++")


def repetitive(batch: int, width: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (batch, width), generator=g)
    # paste earlier spans later so that long n-grams recur
    for b in range(batch):
        for _ in range(width // 16):
            src = int(torch.randint(0, width // 2, (1,), generator=g))
            dst = int(torch.randint(width // 2, width - 8, (1,), generator=g))
            base[b, dst : dst + 8] = base[b, src : src + 8].clone()
    return base


def fresh(batch, groups, bits):
    return torch.full((batch, groups, 1 << bits), -1, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [4, 12])  # 4: tiny table, many collisions
def test_incremental_matches_reference(isa, seed, bits):
    batch, width, min_n, max_n, k = 3, 200, 1 + seed % 2, 3 + seed % 2, 7
    tokens = repetitive(batch, width, vocab=12 + 50 * (seed % 2), seed=seed)
    lengths = torch.tensor([5, 1, 9])
    t_c, i_c = fresh(batch, max_n - min_n + 1, bits)
    t_r, i_r = fresh(batch, max_n - min_n + 1, bits)
    g = torch.Generator().manual_seed(seed + 100)
    while int(lengths.min()) < width:
        ngram_index_update(t_c, tokens, lengths, i_c, min_n)
        ngram_index_update_reference(t_r, tokens, lengths, i_r, min_n)
        assert torch.equal(t_c, t_r) and torch.equal(i_c, i_r)
        d_c, n_c = ngram_lookup(t_c, tokens, lengths, min_n, k)
        d_r, n_r = ngram_lookup_reference(t_r, tokens, lengths, min_n, k)
        assert torch.equal(n_c, n_r) and torch.equal(d_c, d_r)
        lengths = (lengths + torch.randint(1, 9, (batch,), generator=g)).clamp_max(width)


def test_incremental_equals_one_shot():
    tokens = repetitive(2, 120, vocab=20, seed=3)
    lengths = torch.tensor([120, 77])
    t1, i1 = fresh(2, 3, 10)
    ngram_index_update(t1, tokens, lengths, i1, 1)
    t2, i2 = fresh(2, 3, 10)
    for stop in range(2, 121, 13):
        ngram_index_update(t2, tokens, torch.minimum(lengths, torch.tensor(stop)), i2, 1)
    ngram_index_update(t2, tokens, lengths, i2, 1)
    assert torch.equal(t1, t2) and torch.equal(i1, i2)
    assert i1.tolist() == [119, 76]


def test_lookup_semantics():
    # ... 5 6 7 8 9 | 5 6 7 -> the longest match (3-gram "5 6 7") continues with 8 9 ...
    seq = [1, 5, 6, 7, 8, 9, 4, 6, 7, 2, 5, 6, 7]
    tokens = torch.tensor([seq])
    lengths = torch.tensor([len(seq)])
    table, indexed = fresh(1, 3, 8)
    ngram_index_update(table, tokens, lengths, indexed, 1)
    drafts, counts = ngram_lookup(table, tokens, lengths, 1, 4)
    assert counts.tolist() == [4] and drafts.tolist() == [[8, 9, 4, 6]]
    # draft length is limited by the text after the match
    drafts, counts = ngram_lookup(table, tokens, lengths, 1, 40)
    assert counts.tolist() == [len(seq) - 1 - 3]
    # a 2-gram only ("6 7"): the most recent occurrence wins (position 8 -> continues with 2)
    seq2 = [1, 6, 7, 8, 3, 6, 7, 2, 9, 6, 7]
    t2 = torch.tensor([seq2])
    table, indexed = fresh(1, 2, 8)
    ngram_index_update(table, t2, torch.tensor([len(seq2)]), indexed, 2)
    drafts, counts = ngram_lookup(table, t2, torch.tensor([len(seq2)]), 2, 2)
    assert drafts.tolist() == [[2, 9]] and counts.tolist() == [2]
    # no match at all
    t3 = torch.tensor([[1, 2, 3, 4]])
    table, indexed = fresh(1, 3, 8)
    ngram_index_update(table, t3, torch.tensor([4]), indexed, 1)
    assert ngram_lookup(table, t3, torch.tensor([4]), 1, 3)[1].tolist() == [0]


def test_opcheck():
    tokens = repetitive(2, 40, vocab=9, seed=1)
    lengths = torch.tensor([40, 23])
    table, indexed = fresh(2, 2, 6)
    torch.library.opcheck(ngram_index_update, (table, tokens, lengths, indexed, 2))
    table2, indexed2 = fresh(2, 2, 6)
    ngram_index_update(table2, tokens, lengths, indexed2, 2)
    torch.library.opcheck(ngram_lookup, (table2, tokens, lengths, 2, 5))


def test_errors():
    tokens = torch.zeros((1, 8), dtype=torch.int64)
    with pytest.raises((ValueError, RuntimeError), match="power of two"):
        ngram_lookup(torch.full((1, 1, 6), -1, dtype=torch.int64), tokens, torch.tensor([8]), 1, 2)
    with pytest.raises((ValueError, RuntimeError), match="exceeds"):
        ngram_lookup(torch.full((1, 1, 8), -1, dtype=torch.int64), tokens, torch.tensor([9]), 1, 2)
    with pytest.raises((TypeError, RuntimeError), match="int64"):
        ngram_lookup(torch.full((1, 1, 8), -1, dtype=torch.int64), tokens.int(), torch.tensor([8]), 1, 2)
