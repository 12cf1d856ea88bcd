"""The engine's ops: compiled kernels against their references on awkward shapes for every ISA,
row invariance (batch, window, thread count), and opcheck."""

from __future__ import annotations

import pytest
import torch

from infertrix.ops import engine as E


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 17), (4, 64), (1, 576), (7, 33)])
def test_norms_and_gated_products_match_reference(isa, shape):
    g = _g(sum(shape))
    x, r = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(E.rms_norm(x, w, 1e-6), E.rms_norm_reference(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    s, n = E.add_rms_norm(x, r, w, 1e-5)
    s_ref, n_ref = E.add_rms_norm_reference(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(n, n_ref, rtol=2e-6, atol=2e-6)
    gu = torch.cat([x * 4, r], -1)
    torch.testing.assert_close(E.silu_mul(gu), E.silu_mul_reference(gu), rtol=3e-6, atol=3e-6)
    torch.testing.assert_close(E.gelu_tanh_mul(gu), E.gelu_tanh_mul_reference(gu), rtol=3e-6, atol=3e-6)


def test_gated_products_saturate(isa):
    """Far from 0 SiLU and GELU are 0 or the identity: no overflow in their exponentials."""
    g = torch.tensor([-1e4, -200.0, -90.0, -20.0, 20.0, 90.0, 1e4] * 3)
    gu = torch.cat([g, torch.full_like(g, 2.0)])[None]
    torch.testing.assert_close(E.gelu_tanh_mul(gu), E.gelu_tanh_mul_reference(gu))
    torch.testing.assert_close(E.silu_mul(gu), E.silu_mul_reference(gu))


@pytest.mark.parametrize("shape", [(1, 1, 3, 8), (2, 5, 4, 16), (3, 2, 1, 64), (1, 7, 9, 6)])
def test_rope_and_append_are_exact(isa, shape):
    b, t, n, d = shape
    g = _g(d + t)
    base = torch.randn(b, t, n + 2, d, generator=g)
    x = base[:, :, 1 : n + 1]  # a strided view, as the engine passes slices of a q/k/v output
    cos, sin = torch.randn(20, d, generator=g), torch.randn(20, d, generator=g)
    pos = torch.randint(0, 20, (b, t), generator=g)
    assert torch.equal(E.rope(x, cos, sin, pos), E.rope_reference(x, cos, sin, pos))
    kc, vc = torch.zeros(b, n, t + 5, d), torch.zeros(b, n, t + 5, d)
    kr, vr = kc.clone(), vc.clone()
    E.kv_append(kc, vc, x, x * 2, 3)
    E.kv_append_reference(kr, vr, x, x * 2, 3)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def _attention_inputs(b, t, h, kvh, d, cap, seed):
    g = _g(seed)
    q = torch.randn(b, t, h, d, generator=g)
    k, v = torch.randn(b, kvh, cap, d, generator=g), torch.randn(b, kvh, cap, d, generator=g)
    return q, k, v


# (B, T, H, KV, D, index): one token, a window, odd head_dim, more than one KV block, GQA 9/3,
# head_dim past the kernel's 8 vectors of value accumulators (with a tail)
@pytest.mark.parametrize("case", [(1, 1, 2, 1, 8, 0), (2, 4, 6, 2, 12, 7), (3, 3, 9, 3, 64, 150),
                                  (1, 12, 4, 4, 5, 60), (2, 1, 3, 1, 33, 200), (1, 2, 4, 2, 152, 70)])
@pytest.mark.parametrize("window", [0, 50])
def test_attention_matches_reference(isa, case, window):
    b, t, h, kvh, d, index = case
    q, k, v = _attention_inputs(b, t, h, kvh, d, index + t + 3, seed=index)
    start = torch.tensor([min(i * 5, index) for i in range(b)])
    out = E.gqa_attention(q, k, v, start, index, d**-0.5, window)
    ref = E.gqa_attention_reference(q, k, v, start, index, d**-0.5, window)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", [(1, 1, 2, 1, 8, 0), (2, 4, 6, 2, 12, 7), (3, 3, 9, 3, 64, 150),
                                  (1, 12, 4, 4, 5, 60), (2, 1, 3, 1, 33, 200), (1, 2, 4, 2, 152, 70)])
@pytest.mark.parametrize("window", [0, 50])
def test_attention_probs_match_reference(isa, case, window):
    """The optional probabilities (what H2O / SnapKV / TOVA score with) equal the reference's
    softmax, hidden slots and padding queries 0; the output is unchanged by asking for them."""
    b, t, h, kvh, d, index = case
    q, k, v = _attention_inputs(b, t, h, kvh, d, index + t + 3, seed=index)
    start = torch.tensor([min(i * 5, index + t - 1 if i == b - 1 else index) for i in range(b)])
    probs = torch.full((b, h, t, index + t), float("nan"))
    out = E.gqa_attention(q, k, v, start, index, d**-0.5, window, probs)
    ref_probs = torch.empty_like(probs)
    ref = E.gqa_attention_reference(q, k, v, start, index, d**-0.5, window, ref_probs)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    assert torch.equal(out, E.gqa_attention(q, k, v, start, index, d**-0.5, window))
    torch.testing.assert_close(probs, ref_probs, rtol=2e-5, atol=1e-7)
    assert bool((probs[ref_probs == 0] == 0).all())


def test_attention_padding_query_is_zero():
    q, k, v = _attention_inputs(1, 3, 2, 1, 8, 4, seed=1)
    out = E.gqa_attention(q, k, v, torch.tensor([2]), 0, 0.3, 0)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))  # slots 0, 1 precede the row's start


@pytest.mark.parametrize("d", [16, 64, 128])  # 64 and 128: the kernels unrolled for a head_dim known when compiled
def test_attention_is_invariant(isa, d):
    """A query's output is the same bits alone, in a window, in a padded batch, at 1 and 2 threads."""
    h, kvh, n = 6, 2, 140
    q, k, v = _attention_inputs(1, 12, h, kvh, d, n + 12 + 9, seed=5)
    ref = [E.gqa_attention(q[:, i : i + 1], k, v, torch.tensor([0]), n + i, 0.25, 0) for i in range(12)]
    threads = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            for w in (1, 3, 12):
                for s in range(0, 12, w):
                    out = E.gqa_attention(q[:, s : s + w], k, v, torch.tensor([0]), n + s, 0.25, 0)
                    for j in range(out.shape[1]):
                        assert torch.equal(out[:, j : j + 1], ref[s + j])
            # the same row left-padded by 9 slots inside a batch of 3
            pad = 9
            kp = torch.cat([torch.randn(3, kvh, pad, d), k.expand(3, -1, -1, -1)], 2).contiguous()
            vp = torch.cat([torch.randn(3, kvh, pad, d), v.expand(3, -1, -1, -1)], 2).contiguous()
            qb = torch.cat([q[:, 4:5], torch.randn(2, 1, h, d)])
            out = E.gqa_attention(qb, kp, vp, torch.tensor([pad, 0, 3]), n + 4 + pad, 0.25, 0)
            assert torch.equal(out[:1], ref[4])
            # the probabilities too: a window's query equals the step, a padded row the row alone
            step = torch.empty(1, h, 1, n + 5)
            E.gqa_attention(q[:, 4:5], k, v, torch.tensor([0]), n + 4, 0.25, 0, step)
            win = torch.empty(1, h, 3, n + 6)
            E.gqa_attention(q[:, 3:6], k, v, torch.tensor([0]), n + 3, 0.25, 0, win)
            assert torch.equal(win[:, :, 1:2, : n + 5], step) and not bool(win[:, :, 1, n + 5].any())
            padded = torch.empty(3, h, 1, n + 5 + pad)
            E.gqa_attention(qb, kp, vp, torch.tensor([pad, 0, 3]), n + 4 + pad, 0.25, 0, padded)
            assert torch.equal(padded[:1, :, :, pad:], step) and not bool(padded[0, :, :, :pad].any())
    finally:
        torch.set_num_threads(threads)


def test_long_prompt_in_chunks_is_invariant(isa):
    """A prompt long enough that the op works through its queries in chunks (a bounded buffer of
    partial results): each query the same bits as in windows of another size, and near the reference."""
    b, t, h, kvh, d = 2, 400, 9, 3, 64  # 800 (row, token) pairs of 7 key blocks: 4 chunks
    q, k, v = _attention_inputs(b, t, h, kvh, d, t, seed=3)
    start = torch.tensor([0, 23])
    whole = E.gqa_attention(q, k, v, start, 0, d**-0.5, 0)
    parts = [E.gqa_attention(q[:, s : s + 37], k, v, start, s, d**-0.5, 0) for s in range(0, t, 37)]
    assert torch.equal(whole, torch.cat(parts, 1))
    ref = E.gqa_attention_reference(q, k, v, start, 0, d**-0.5, 0)
    torch.testing.assert_close(whole, ref, rtol=2e-5, atol=2e-6)


def test_rows_are_invariant():
    g = _g(3)
    x, r, w = torch.randn(9, 200, generator=g), torch.randn(9, 200, generator=g), torch.randn(200, generator=g)
    full = E.rms_norm(x, w, 1e-6)
    s_full, n_full = E.add_rms_norm(x, r, w, 1e-6)
    silu_full = E.silu_mul(torch.cat([x, r], -1))
    gelu_full = E.gelu_tanh_mul(torch.cat([x, r], -1))
    for i in range(9):
        assert torch.equal(E.rms_norm(x[i : i + 1], w, 1e-6)[0], full[i])
        assert torch.equal(E.add_rms_norm(x[i : i + 1], r[i : i + 1], w, 1e-6)[1][0], n_full[i])
        assert torch.equal(E.silu_mul(torch.cat([x[i : i + 1], r[i : i + 1]], -1))[0], silu_full[i])
        assert torch.equal(E.gelu_tanh_mul(torch.cat([x[i : i + 1], r[i : i + 1]], -1))[0], gelu_full[i])


def test_opcheck():
    g = _g(0)
    x, w = torch.randn(2, 3, 16, generator=g), torch.randn(16, generator=g)
    torch.library.opcheck(E.rms_norm, (x, w, 1e-6))
    torch.library.opcheck(E.add_rms_norm, (x, x * 2, w, 1e-6))
    torch.library.opcheck(E.silu_mul, (x,))
    torch.library.opcheck(E.gelu_tanh_mul, (x,))
    cos, sin, pos = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.tensor([[0, 5, 7]] * 2)
    torch.library.opcheck(E.rope, (x.view(2, 3, 1, 16), cos, sin, pos))
    kc, vc = torch.zeros(2, 1, 6, 16), torch.zeros(2, 1, 6, 16)
    torch.library.opcheck(E.kv_append, (kc, vc, x.view(2, 3, 1, 16), x.view(2, 3, 1, 16), 2))
    q = torch.randn(2, 3, 2, 16, generator=g)
    torch.library.opcheck(E.gqa_attention, (q, kc, vc, torch.tensor([0, 1]), 2, 0.25, 0))
    torch.library.opcheck(E.gqa_attention, (q, kc, vc, torch.tensor([0, 1]), 2, 0.25, 0, torch.zeros(2, 2, 3, 5)))
