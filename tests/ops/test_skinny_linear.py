"""infertrix::skinny_linear: compiled kernels against torch's linear, batch independence, fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infertrix.ops import skinny_linear
from infertrix.ops.skinny_linear import MAX_ROWS, skinny_linear_reference

# (rows, N, K): one row, odd N and K, K below one vector, K with a masked tail, N not a multiple
# of any block, more rows than one register block, the row limit
SHAPES = [(1, 7, 5), (1, 49, 576), (2, 33, 17), (3, 100, 31), (4, 16, 1536), (5, 19, 23), (8, 65, 64),
          (9, 49, 577), (17, 1, 1), (MAX_ROWS, 37, 130)]


def _inputs(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(isa, shape):
    x, w, b = _inputs(*shape, seed=sum(shape))
    for bias in (b, None):
        y = skinny_linear(x, w, bias)
        exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        # float32 rounding of a K-term dot product: relative to the terms' magnitudes
        scale = (x.abs().double() @ w.abs().double().t()) + (0 if bias is None else bias.abs().double())
        assert y.dtype == torch.float32 and y.shape == (shape[0], shape[1])
        assert torch.all((y.double() - exact).abs() <= 1e-6 * scale + 1e-6), (isa, shape)
        assert torch.allclose(y, skinny_linear_reference(x, w, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 50, 333), (MAX_ROWS, 21, 64), (3, 1, 1000)])
def test_row_independent_of_batch(isa, shape):
    """A row's output is bitwise the same alone, inside any batch, and at any thread count."""
    x, w, b = _inputs(*shape, seed=3)
    full = skinny_linear(x, w, b)
    threads = torch.get_num_threads()
    try:
        for t in {1, 2}:
            torch.set_num_threads(t)
            for i in range(shape[0]):
                assert torch.equal(skinny_linear(x[i : i + 1], w, b)[0], full[i])
                assert torch.equal(skinny_linear(x[: i + 1], w, b)[i], full[i])
    finally:
        torch.set_num_threads(threads)


def test_leading_dims_and_fallbacks():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(2, 3, 40, generator=g)  # [batch, tokens, K]: 6 rows
    assert torch.allclose(skinny_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    big = torch.randn(MAX_ROWS + 1, 40, generator=g)  # more rows: torch's own linear, exactly
    assert torch.equal(skinny_linear(big, w, b), F.linear(big, w, b))
    xb, wb = x.bfloat16(), w.bfloat16()  # other dtypes: torch's own linear
    assert torch.equal(skinny_linear(xb, wb, None), F.linear(xb, wb))
    assert skinny_linear(torch.randn(0, 40), w, b).shape == (0, 24)


def test_bad_shapes_are_refused():
    with pytest.raises((ValueError, RuntimeError), match="skinny_linear"):
        skinny_linear(torch.randn(2, 5), torch.randn(3, 4), None)
    with pytest.raises((ValueError, RuntimeError), match="skinny_linear"):
        skinny_linear(torch.randn(2, 4), torch.randn(3, 4, 1), None)


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    for m, n, k in [(1, 9, 17), (4, 33, 64)]:
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        torch.library.opcheck(torch.ops.infertrix.skinny_linear.default, (x, w, b))
        torch.library.opcheck(torch.ops.infertrix.skinny_linear.default, (x, w, None))
