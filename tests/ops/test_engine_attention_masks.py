"""``gqa_attention``'s masks beyond left padding. Token trees (``tree``): the kernel against its
reference, and each node the same bits as the same token in a linear window of its path (what
makes tree verification on the decode engine token-identical to plain decoding, quantized
targets included). Slots hidden per KV head (``hidden``, AdaKV's head budgets): the kernel
against its reference, probabilities included, and a padded row the bits of the row alone."""

from __future__ import annotations

import random

import pytest
import torch

from infertrix.ops import engine as E


def _tree(t: int, seed: int) -> list[int]:
    """Parents of t new slots: slot 0 the root, every later slot a child of an earlier one."""
    rng = random.Random(seed)
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def _path(parents: list[int], node: int) -> list[int]:
    out = [node]
    while parents[out[-1]] >= 0:
        out.append(parents[out[-1]])
    return out[::-1]


# (B, T, H, KV, D, index): a block boundary inside the path (index 60 + depth), GQA 9/3, odd head_dim
@pytest.mark.parametrize("case", [(1, 6, 2, 1, 8, 3), (2, 9, 6, 2, 12, 60), (3, 12, 9, 3, 64, 130),
                                  (1, 20, 4, 4, 33, 62), (2, 5, 4, 2, 128, 0)])
@pytest.mark.parametrize("window", [0, 40])
def test_tree_attention_matches_reference(isa, case, window):
    b, t, h, kvh, d, index = case
    g = torch.Generator().manual_seed(index + t)
    q = torch.randn(b, t, h, d, generator=g)
    k, v = torch.randn(b, kvh, index + t + 2, d, generator=g), torch.randn(b, kvh, index + t + 2, d, generator=g)
    tree = torch.tensor([_tree(t, seed=r + index) for r in range(b)])
    start = torch.tensor([min(r * 3, index) for r in range(b)])
    out = E.gqa_attention(q, k, v, start, index, d**-0.5, window, None, tree)
    ref = E.gqa_attention_reference(q, k, v, start, index, d**-0.5, window, None, tree)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    chain = torch.tensor([[-1] + list(range(t - 1))] * b)  # a linear window is the tree of a chain
    assert torch.equal(E.gqa_attention(q, k, v, start, index, d**-0.5, window, None, chain),
                       E.gqa_attention(q, k, v, start, index, d**-0.5, window))


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("index", [5, 61, 200])  # paths inside one block, across a block boundary, past several
def test_tree_node_equals_its_linear_path(isa, d, index):
    """Each node's output is the bits of its token at the end of a linear window holding its path,
    with the path's keys in consecutive slots, at 1 and 2 threads, in a padded batch of 2."""
    h, kvh, t, pad = 6, 2, 14, 7
    g = torch.Generator().manual_seed(index)
    q = torch.randn(1, t, h, d, generator=g)
    past_k, past_v = torch.randn(1, kvh, index, d, generator=g), torch.randn(1, kvh, index, d, generator=g)
    new_k, new_v = torch.randn(1, kvh, t, d, generator=g), torch.randn(1, kvh, t, d, generator=g)
    parents = _tree(t, seed=d + index)
    # the tree row, and a second row left-padded by `pad` slots carrying the same tree
    k = torch.cat([past_k, new_k], 2)
    v = torch.cat([past_v, new_v], 2)
    kp = torch.cat([torch.randn(1, kvh, pad, d, generator=g), k], 2)
    vp = torch.cat([torch.randn(1, kvh, pad, d, generator=g), v], 2)
    threads = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            one = E.gqa_attention(q, k, v, torch.tensor([0]), index, 0.3, 0, None, torch.tensor([parents]))
            two = E.gqa_attention(torch.cat([q, q]), torch.cat([k, kp[:, :, pad:]]).contiguous(),
                                  torch.cat([v, vp[:, :, pad:]]).contiguous(), torch.tensor([0, 0]), index, 0.3, 0,
                                  None, torch.tensor([parents, parents]))
            padded = E.gqa_attention(q, kp.contiguous(), vp.contiguous(), torch.tensor([pad]), index + pad, 0.3, 0,
                                     None, torch.tensor([parents]))
            for node in range(t):
                path = _path(parents, node)
                lk = torch.cat([past_k, new_k[:, :, path]], 2).contiguous()
                lv = torch.cat([past_v, new_v[:, :, path]], 2).contiguous()
                linear = E.gqa_attention(q[:, path], lk, lv, torch.tensor([0]), index, 0.3, 0)[:, -1]
                assert torch.equal(one[:, node], linear), (th, node, path)
                assert torch.equal(two[1:, node], linear)
                assert torch.equal(padded[:, node], linear)
    finally:
        torch.set_num_threads(threads)


def test_tree_rejects_bad_parents_and_probs():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 1, 6, 8)
    with pytest.raises(RuntimeError, match="earlier"):
        E.gqa_attention(q, k, k, torch.tensor([0]), 2, 0.3, 0, None, torch.tensor([[-1, 2, 0]]))
    with pytest.raises(RuntimeError, match="probs"):
        E.gqa_attention(q, k, k, torch.tensor([0]), 2, 0.3, 0, torch.zeros(1, 2, 3, 5), torch.tensor([[-1, 0, 0]]))
    with pytest.raises(ValueError, match="earlier"):
        E.gqa_attention_reference(q, k, k, torch.tensor([0]), 2, 0.3, 0, None, torch.tensor([[-1, 2, 0]]))
    with pytest.raises(RuntimeError, match="start in the cache"):  # a row that starts inside the tree
        E.gqa_attention(q, k, k, torch.tensor([3]), 2, 0.3, 0, None, torch.tensor([[-1, 0, 1]]))
    with pytest.raises(ValueError, match="start in the cache"):
        E.gqa_attention_reference(q, k, k, torch.tensor([3]), 2, 0.3, 0, None, torch.tensor([[-1, 0, 1]]))


def test_tree_opcheck():
    q, kc = torch.randn(2, 4, 2, 16), torch.randn(2, 1, 9, 16)
    torch.library.opcheck(E.gqa_attention, (q, kc, kc.clone(), torch.tensor([0, 2]), 5, 0.25, 0, None,
                                            torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 1]])))


@pytest.mark.parametrize("case", [(1, 1, 2, 1, 8, 9), (2, 4, 6, 2, 12, 70), (3, 2, 9, 3, 64, 150), (2, 1, 4, 4, 33, 64)])
@pytest.mark.parametrize("with_probs", [False, True])
def test_hidden_slots_match_reference(isa, case, with_probs):
    b, t, h, kvh, d, index = case
    g = torch.Generator().manual_seed(index)
    q = torch.randn(b, t, h, d, generator=g)
    k, v = torch.randn(b, kvh, index + t, d, generator=g), torch.randn(b, kvh, index + t, d, generator=g)
    hidden = torch.rand(b, kvh, index - 3, generator=g) < 0.4
    hidden[0, 0, :] = True  # a head that sees only the last 3 cached slots and the new ones
    start = torch.tensor([min(r * 4, index - 1) for r in range(b)])
    probs = torch.full((b, h, t, index + t), float("nan")) if with_probs else None
    ref_probs = torch.empty(b, h, t, index + t) if with_probs else None
    out = E.gqa_attention(q, k, v, start, index, d**-0.5, 0, probs, None, hidden)
    ref = E.gqa_attention_reference(q, k, v, start, index, d**-0.5, 0, ref_probs, None, hidden)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    if with_probs:
        torch.testing.assert_close(probs, ref_probs, rtol=2e-5, atol=1e-7)
        assert bool((probs[ref_probs == 0] == 0).all())
    none = torch.zeros(b, kvh, index - 3, dtype=torch.bool)
    assert torch.equal(E.gqa_attention(q, k, v, start, index, d**-0.5, 0, None, None, none),
                       E.gqa_attention(q, k, v, start, index, d**-0.5, 0))


@pytest.mark.parametrize("index", [20, 130])
def test_hidden_slots_padded_row_equals_alone(isa, index):
    """A row left-padded by 5 slots with its mask shifted by them: the bits of the row alone, with
    and without probabilities, at 1 and 2 threads."""
    h, kvh, d, t, pad = 6, 2, 16, 3, 5
    g = torch.Generator().manual_seed(index)
    q = torch.randn(1, t, h, d, generator=g)
    k, v = torch.randn(1, kvh, index + t, d, generator=g), torch.randn(1, kvh, index + t, d, generator=g)
    hidden = torch.rand(1, kvh, index, generator=g) < 0.3
    kp = torch.cat([torch.randn(1, kvh, pad, d, generator=g), k], 2)
    vp = torch.cat([torch.randn(1, kvh, pad, d, generator=g), v], 2)
    hp = torch.cat([torch.zeros(1, kvh, pad, dtype=torch.bool), hidden], 2)
    other = torch.randn(1, t, h, d, generator=g)
    threads = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            alone_p = torch.empty(1, h, t, index + t)
            alone = E.gqa_attention(q, k, v, torch.tensor([0]), index, 0.3, 0, alone_p, None, hidden)
            batch_p = torch.empty(2, h, t, index + pad + t)
            batch = E.gqa_attention(torch.cat([other, q]), torch.cat([kp, kp]).contiguous(),
                                    torch.cat([vp, vp]).contiguous(), torch.tensor([0, pad]), index + pad, 0.3, 0,
                                    batch_p, None, torch.cat([torch.zeros_like(hp), hp]))
            assert torch.equal(batch[1:], alone)
            assert torch.equal(batch_p[1:, :, :, pad:], alone_p)
    finally:
        torch.set_num_threads(threads)


def test_hidden_opcheck():
    q, kc = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 9, 16)
    hidden = torch.zeros(2, 2, 6, dtype=torch.bool)
    hidden[0, 1, 2:4] = True
    torch.library.opcheck(E.gqa_attention, (q, kc, kc.clone(), torch.tensor([0, 2]), 7, 0.25, 0, None, None, hidden))
    torch.library.opcheck(E.gqa_attention, (q, kc, kc.clone(), torch.tensor([0, 2]), 7, 0.25, 0,
                                            torch.zeros(2, 4, 2, 9), None, hidden))
