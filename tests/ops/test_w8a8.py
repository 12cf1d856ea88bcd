"""infertrix::w8a8_linear: compiled kernels against the PyTorch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops.w8a8 import MAX_IN_FEATURES, MAX_ROWS, w8a8_linear, w8a8_linear_reference
from infertrix.quant import W8A8Linear

# (M, N, K): one row, K below one vector, K with a byte tail (577, 100, 33), N not a multiple of any
# block (one to 16 weight rows per block), every row-chunk size up to 8, several chunks, the row
# limit and past it (torch._int_mm), SmolLM2's shapes
SHAPES = [(1, 7, 5), (1, 49, 576), (1, 576, 1536), (2, 33, 17), (3, 100, 31), (4, 19, 64), (5, 9, 577),
          (7, 65, 100), (8, 16, 33), (9, 23, 130), (17, 5, 64), (MAX_ROWS, 37, 96), (MAX_ROWS + 3, 21, 70),
          (2, 1, 1)]


def _inputs(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, : min(k, 3)] = torch.tensor([-127, 127, 0], dtype=torch.int8)[: min(k, 3)]  # the extremes
    x = torch.randn(m, k, generator=g) * 4
    if k > 2:
        x[0, 1] = 0.0  # a zero activation (no sign) and a row's largest magnitude, both signs
        x[-1, 2] = -x[-1].abs().max() * 2
    return x, q, torch.rand(n, generator=g) * 1e-2 + 1e-4, torch.randn(n, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_bit_for_bit(isa, shape):
    x, q, scale, b = _inputs(*shape, seed=sum(shape))
    for bias in (b, None):
        y = w8a8_linear(x, q, scale, bias)
        assert y.dtype == torch.float32 and y.shape == (shape[0], shape[1])
        assert torch.equal(y, w8a8_linear_reference(x, q, scale, bias)), (isa, shape)


def test_extreme_sums_do_not_overflow(isa):
    """Every product at +-127 * 127: the largest int32 sums the kernels can meet, both signs."""
    k = 4100
    q = torch.full((18, k), 127, dtype=torch.int8)
    q[1::2] = -127
    x = torch.ones(3, k)
    x[1] = -1.0
    scale = torch.ones(18)
    y = w8a8_linear(x, q, scale)
    # every activation quantizes to +-127, so the integer sum is +-127 * 127 * k; x_scale = 1/127
    assert torch.equal(y, w8a8_linear_reference(x, q, scale))
    assert y[0, 0].item() == pytest.approx(127 * k, rel=1e-6) and y[1, 0].item() == pytest.approx(-127 * k, rel=1e-6)


@pytest.mark.parametrize("shape", [(6, 50, 333), (MAX_ROWS, 21, 64)])
def test_row_independent_of_batch_and_threads(isa, shape):
    x, q, scale, b = _inputs(*shape, seed=5)
    full = w8a8_linear(x, q, scale, b)
    threads = torch.get_num_threads()
    try:
        for t in {1, 2}:
            torch.set_num_threads(t)
            for i in range(shape[0]):
                assert torch.equal(w8a8_linear(x[i : i + 1], q, scale, b)[0], full[i])
                assert torch.equal(w8a8_linear(x[: i + 1], q, scale, b)[i], full[i])
    finally:
        torch.set_num_threads(threads)


def test_leading_dims_dtypes_and_noncontiguous():
    x, q, scale, b = _inputs(6, 40, 72, seed=1)
    x3 = x.view(2, 3, 72)
    assert torch.equal(w8a8_linear(x3, q, scale, b), w8a8_linear_reference(x3, q, scale, b))
    for dt in (torch.bfloat16, torch.float16):
        y = w8a8_linear(x3.to(dt), q, scale, b.to(dt))
        assert y.dtype == dt and torch.equal(y, w8a8_linear_reference(x3.to(dt), q, scale, b.to(dt)))
    wide = torch.randn(6, 144)
    xs = wide[:, ::2]  # a strided view
    assert torch.equal(w8a8_linear(xs, q, scale), w8a8_linear_reference(xs.contiguous(), q, scale))
    empty = torch.empty(0, 72)
    assert w8a8_linear(empty, q, scale).shape == (0, 40)


def test_bad_inputs_raise_clear_errors():
    x, q, scale, _ = _inputs(2, 8, 16, seed=2)
    for fn in (w8a8_linear, w8a8_linear_reference):
        with pytest.raises((ValueError, RuntimeError), match="in_features"):
            fn(torch.randn(2, 15), q, scale)
        with pytest.raises((TypeError, RuntimeError), match="int8"):
            fn(x, q.to(torch.int16), scale)
        with pytest.raises((TypeError, RuntimeError), match="float32"):
            fn(x.double(), q, scale)
        with pytest.raises((ValueError, RuntimeError), match="scale"):
            fn(x, q, scale[:-1])
        with pytest.raises((ValueError, RuntimeError), match="overflow"):
            fn(torch.randn(1, MAX_IN_FEATURES + 1), torch.zeros(1, MAX_IN_FEATURES + 1, dtype=torch.int8),
               torch.ones(1))
    bad = q.clone()
    bad[0, 0] = -128
    with pytest.raises(ValueError, match="-127, 127"):
        w8a8_linear_reference(x, bad, scale)
    with pytest.raises(ValueError, match="-127, 127"):
        W8A8Linear.from_weight(bad, scale, None, torch.float32)
    mod = W8A8Linear(16, 8)
    with pytest.raises(ValueError, match="-127, 127"):  # a checkpoint with the code -128
        mod.load_state_dict({"qweight": bad, "scale": scale})


def test_module_runs_the_op_and_reports_its_backend():
    x, q, scale, b = _inputs(3, 24, 48, seed=3)
    mod = W8A8Linear.from_weight(q, scale, b, torch.float32)
    assert torch.equal(mod(x), w8a8_linear_reference(x, q, scale, b))
    if ops.status().extension.startswith("loaded"):
        assert ops.status()["w8a8_linear"]["cpu"].startswith("c++")


def test_opcheck_and_compile():
    x, q, scale, b = _inputs(3, 24, 80, seed=4)
    torch.library.opcheck(w8a8_linear, (x.view(1, 3, 80), q, scale, b))
    torch.library.opcheck(w8a8_linear, (x[:1], q, scale, None))
    fn = torch.compile(lambda t: w8a8_linear(t, q, scale, b), backend="eager", fullgraph=True)
    assert torch.equal(fn(x), w8a8_linear_reference(x, q, scale, b))
