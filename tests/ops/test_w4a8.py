"""infertrix::w4a8_matmul_int32 / w4a8_linear / w4a8_linear_argmax: compiled kernels against the PyTorch
reference."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops import w4a8 as w4
from infertrix.ops.quantize import quantize_per_token_int8_reference


def random_weights(n: int, k: int, group_size: int, zero_point: bool, seed: int):
    """Random packed weights covering the full code and scale ranges (worst case for overflow)."""
    g = torch.Generator().manual_seed(seed)
    groups = w4.num_groups(k, group_size)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s2max = w4.max_group_scale(k, zero_point)
    s2 = torch.randint(1, s2max + 1, (n, groups), generator=g)
    s2[0] = s2max  # one channel at the bound
    zero = w4.pack_group_params(torch.randint(0, 16, (n, groups), generator=g)) if zero_point else None
    scale = torch.rand(n, generator=g) * 1e-3 + 1e-5
    return w4.pack_int4(q), scale, w4.pack_group_params(s2), zero


# (M, N, K, group): M = 1, odd N, K not a multiple of the group (576 / 128), K not a multiple of 8
SHAPES = [
    (1, 576, 576, 128),
    (1, 33, 576, 128),
    (3, 17, 100, 32),
    (5, 192, 576, 64),
    (8, 64, 1536, 128),
    (4, 31, 40, -1),
    (9, 48, 13, 32),
    (32, 70, 256, 64),
    (2, 1, 8, 8),
    (7, 40, 96, 32),  # 4 rows, then a 3-row tile
    (6, 33, 200, 64),  # 4 rows, then a 2-row tile
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_point", [False, True])
def test_int32_matches_reference_bit_for_bit(isa, shape, zero_point):
    m, n, k, gs = shape
    qweight, _, s2, zero = random_weights(n, k, gs, zero_point, seed=m * 1000 + n + k)
    g = torch.Generator().manual_seed(n)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x_q[0, : min(k, 64)] = 127  # saturated activations
    out = w4.w4a8_matmul_int32(x_q, qweight, s2, zero, k, n, gs)
    ref = w4.w4a8_matmul_int32_reference(x_q, qweight, s2, zero, k, n, gs)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference_bit_for_bit(isa, shape, zero_point, dtype):
    m, n, k, gs = shape
    qweight, scale, s2, zero = random_weights(n, k, gs, zero_point, seed=m + n * 7 + k)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    out = w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, bias)
    ref = w4.w4a8_linear_reference(x, qweight, scale, s2, zero, k, gs, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


def test_int32_sum_is_the_integer_product():
    # an independent check of the reference itself: dequantize to integers, multiply in int64
    n, k, gs = 20, 72, 32
    qweight, _, s2, zero = random_weights(n, k, gs, True, seed=1)
    q = w4.unpack_int4(qweight, n, k).long()
    gidx = torch.arange(k) // gs
    w = (q - zero[:, :n].t().long()[:, gidx]) * s2[:, :n].t().long()[:, gidx]
    x_q = torch.randint(-127, 128, (3, k), dtype=torch.int8)
    expect = torch.stack([(x_q[i].long()[None, :] * w).sum(1) for i in range(3)])
    assert torch.equal(w4.w4a8_matmul_int32_reference(x_q, qweight, s2, zero, k, n, gs).long(), expect)


def test_pack_roundtrip():
    q = torch.randint(0, 16, (37, 75), dtype=torch.uint8)
    packed = w4.pack_int4(q)
    assert packed.shape == (3, 10, 64)
    assert torch.equal(w4.unpack_int4(packed, 37, 75), q)


def test_linear_3d_input_and_rows_independent(isa):
    n, k, gs = 40, 96, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=3)
    x = torch.randn(2, 5, k)
    y = w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, None)
    assert y.shape == (2, 5, n)
    for b in range(2):
        for t in range(5):
            yi = w4.w4a8_linear(x[b, t : t + 1], qweight, scale, s2, zero, k, gs, None)
            assert torch.equal(yi[0], y[b, t])


def test_linear_is_close_to_float_matmul():
    # the quantized product approximates the float product of the dequantized weights
    n, k, gs = 64, 256, 64
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=4)
    w = w4.dequantize_int(qweight, s2, zero, k, n, gs).float() * scale[:, None]
    x = torch.randn(6, k)
    y = w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, None)
    exact = x @ w.t()
    assert (y - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("m", [1, 6])
def test_parallel_split_matches_reference(isa, m):
    # big enough for the kernel to split output panels across two threads
    n, k, gs = 4104, 576, 128
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=11 + m)
    x = torch.randn(m, k)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, None)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, w4.w4a8_linear_reference(x, qweight, scale, s2, zero, k, gs, None))


def test_opcheck():
    n, k, gs = 24, 80, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=5)
    x_q = torch.randint(-127, 128, (3, k), dtype=torch.int8)
    torch.library.opcheck(w4.w4a8_matmul_int32, (x_q, qweight, s2, zero, k, n, gs))
    torch.library.opcheck(w4.w4a8_matmul_int32, (x_q, qweight, s2, None, k, n, gs))
    torch.library.opcheck(w4.w4a8_linear, (torch.randn(2, 3, k), qweight, scale, s2, zero, k, gs, torch.randn(n)))
    torch.library.opcheck(w4.w4a8_linear, (torch.randn(1, k), qweight, scale, s2, None, k, gs, None))


def test_torch_compile():
    n, k, gs = 24, 80, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, False, seed=6)
    fn = torch.compile(lambda t: w4.w4a8_linear(t, qweight, scale, s2, zero, k, gs, None), backend="eager", fullgraph=True)
    x = torch.randn(3, k)
    assert torch.equal(fn(x), w4.w4a8_linear_reference(x, qweight, scale, s2, zero, k, gs, None))


def test_clear_errors():
    n, k, gs = 16, 64, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=7)
    with pytest.raises((TypeError, RuntimeError), match="float32, bfloat16 or float16"):
        w4.w4a8_linear(torch.ones(2, k, dtype=torch.int32), qweight, scale, s2, zero, k, gs, None)
    with pytest.raises((ValueError, RuntimeError), match="in_features"):
        w4.w4a8_linear(torch.ones(2, k + 1), qweight, scale, s2, zero, k, gs, None)
    if ops.status().cpu_isa is not None:
        with pytest.raises(RuntimeError, match="qweight must be contiguous uint8"):
            w4.w4a8_matmul_int32(torch.ones(2, k, dtype=torch.int8), qweight[:, :-1], s2, zero, k, n, gs)
        with pytest.raises(RuntimeError, match="group_size"):
            w4.w4a8_matmul_int32(torch.ones(2, k, dtype=torch.int8), qweight, s2, zero, k, n, 12)


def test_status_reports_backend():
    st = ops.status()
    for name in ("w4a8_linear", "w4a8_matmul_int32"):
        assert st[name]["cpu"] == "reference" if st.cpu_isa is None else st[name]["cpu"].startswith("c++/")


def test_quantize_reused_per_token():
    # w4a8_linear quantizes activations exactly as infertrix::quantize_per_token_int8 does
    n, k, gs = 16, 64, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, False, seed=8)
    x = torch.randn(4, k)
    x_q, x_s = quantize_per_token_int8_reference(x)
    acc = w4.w4a8_matmul_int32(x_q, qweight, s2, zero, k, n, gs)
    expect = (acc.float() * x_s) * scale
    assert torch.equal(w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, None), expect)


def test_forward_with_grad_enabled_and_no_backward():
    n, k, gs = 16, 64, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=9)
    x = torch.randn(2, k, requires_grad=True)
    y = w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, None)
    assert torch.equal(y.detach(), w4.w4a8_linear_reference(x.detach(), qweight, scale, s2, zero, k, gs, None))
    with pytest.raises(RuntimeError):
        y.sum().backward()  # quantized layers are for inference: a backward must fail loudly


# ---- w4a8_linear_argmax: the greedy token of a W4A8 LM head, bitwise argmax of its logits
def full_argmax(x, qweight, scale, s2, zero, k, gs, bias):
    return w4.w4a8_linear(x, qweight, scale, s2, zero, k, gs, bias).argmax(-1)


# N: below one 64-channel chunk, one channel, a multiple of 64 plus one, not a multiple of 16,
# SmolLM2-like widths split across threads
@pytest.mark.parametrize("m, n, k, gs", [(1, 33, 576, 128), (3, 1, 40, -1), (4, 65, 100, 32), (5, 1000, 576, 64),
                                         (1, 4104, 576, 128), (9, 4104, 576, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_argmax_of_the_logits(isa, m, n, k, gs, threads):
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=m + n + k)
    x = torch.randn(m, k) * 3
    bias = torch.randn(n) if m % 2 else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tok = w4.w4a8_linear_argmax(x, qweight, scale, s2, zero, k, gs, bias)
    finally:
        torch.set_num_threads(old)
    assert tok.dtype == torch.int64 and tok.shape == (m,)
    assert torch.equal(tok, full_argmax(x, qweight, scale, s2, zero, k, gs, bias))
    assert torch.equal(tok, w4.w4a8_linear_argmax_reference(x, qweight, scale, s2, zero, k, gs, bias))


@pytest.mark.parametrize("threads", [1, 2])
def test_ties_go_to_the_lowest_index(isa, threads):
    # identical channels (same codes, scales) give bit-equal logits in different chunks and tiles
    n, k, gs = 4104, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s2 = torch.ones(n, 2, dtype=torch.uint8)
    scale = torch.full((n,), 1e-3)
    tied = [70, 71, 3000, 4103]
    q[tied] = 15  # every weight at the top code: the largest logit for a positive input
    qweight, gsc = w4.pack_int4(q), w4.pack_group_params(s2)
    x = torch.rand(2, k) + 0.1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tok = w4.w4a8_linear_argmax(x, qweight, scale, gsc, None, k, gs, None)
    finally:
        torch.set_num_threads(old)
    logits = w4.w4a8_linear(x, qweight, scale, gsc, None, k, gs, None)
    assert (logits[:, tied] == logits[:, tied[:1]]).all()
    assert tok.tolist() == [70, 70] == logits.argmax(-1).tolist()


def test_nan_wins_as_in_torch_argmax(isa):
    n, k, gs = 200, 64, 32
    qweight, scale, s2, _ = random_weights(n, k, gs, False, seed=3)
    scale[150] = float("nan")
    scale[190] = float("nan")
    x = torch.randn(1, k)
    tok = w4.w4a8_linear_argmax(x, qweight, scale, s2, None, k, gs, None)
    assert tok.tolist() == [150] == full_argmax(x, qweight, scale, s2, None, k, gs, None).tolist()


def test_3d_input_and_opcheck():
    n, k, gs = 24, 80, 32
    qweight, scale, s2, zero = random_weights(n, k, gs, True, seed=5)
    x = torch.randn(2, 3, k)
    tok = w4.w4a8_linear_argmax(x, qweight, scale, s2, zero, k, gs, None)
    assert tok.shape == (2, 3) and torch.equal(tok, full_argmax(x, qweight, scale, s2, zero, k, gs, None))
    torch.library.opcheck(w4.w4a8_linear_argmax, (x, qweight, scale, s2, zero, k, gs, torch.randn(n)))
    torch.library.opcheck(w4.w4a8_linear_argmax, (torch.randn(1, k), qweight, scale, s2, None, k, gs, None))
