"""infertrix::w8a8_flat_linear (FlattenQuant's per-tensor static int8): kernels against the reference."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops.w8a8 import MAX_ROWS
from infertrix.ops.w8a8_flat import w8a8_flat_linear, w8a8_flat_linear_reference

# (M, N, K, E): one row, tiny K, a byte tail, every row-chunk size, past the row limit, SmolLM2-like
SHAPES = [(1, 7, 5, 2), (1, 49, 576, 12), (2, 33, 17, 0), (3, 100, 31, 5), (5, 9, 577, 30), (8, 16, 33, 1),
          (9, 23, 130, 7), (MAX_ROWS, 37, 96, 3), (MAX_ROWS + 3, 21, 70, 9), (1, 576, 1536, 30)]


def _inputs(m: int, n: int, k: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k + e), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g) * 3
    src = torch.randint(0, k, (e,), generator=g)
    mult = torch.rand(k, generator=g) * 40 + 1  # some products land beyond +-127: clipped
    if k > 2:
        x[0, 1] = 0.0
        mult[2] = 42.5 / x[0, 2].item() if x[0, 2] != 0 else 1.0  # a half-way value: rounds to even
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-4
    return x, q, scale, mult, torch.tensor([0.03]), src, torch.randn(n, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_bit_for_bit(isa, shape):
    x, q, scale, mult, step, src, b = _inputs(*shape, seed=sum(shape))
    for bias in (b, None):
        y = w8a8_flat_linear(x, q, scale, mult, step, src, bias)
        assert y.shape == (shape[0], shape[1])
        assert torch.equal(y, w8a8_flat_linear_reference(x, q, scale, mult, step, src, bias)), (isa, shape)


def test_rows_independent_dtypes_and_leading_dims():
    x, q, scale, mult, step, src, b = _inputs(6, 40, 72, 4, seed=1)
    full = w8a8_flat_linear(x, q, scale, mult, step, src, b)
    for i in range(6):
        assert torch.equal(w8a8_flat_linear(x[i : i + 1], q, scale, mult, step, src, b)[0], full[i])
    x3 = x.view(2, 3, 72)
    assert torch.equal(w8a8_flat_linear(x3, q, scale, mult, step, src, b), full.view(2, 3, 40))
    for dt in (torch.bfloat16, torch.float16):
        y = w8a8_flat_linear(x3.to(dt), q, scale, mult, step, src, b.to(dt))
        assert y.dtype == dt
        assert torch.equal(y, w8a8_flat_linear_reference(x3.to(dt), q, scale, mult, step, src, b.to(dt)))


def test_flattening_is_exact_when_nothing_clips():
    """A channel split into m copies of x / m with its column repeated: the same integer product."""
    k, n = 8, 5
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    x = torch.arange(1, k + 1, dtype=torch.float32)[None] * 3  # channel 7 carries 24: flattened 3 ways
    copies = torch.ones(k, dtype=torch.long)
    copies[7] = 3
    src = torch.repeat_interleave(torch.arange(k), copies - 1)
    wf = torch.cat([w, w[:, src]], 1)
    y = w8a8_flat_linear(x, wf, torch.ones(n), 1.0 / copies.float(), torch.ones(1), src)
    assert torch.equal(y, (x @ w.float().t()))


def test_bad_inputs_raise_clear_errors():
    x, q, scale, mult, step, src, _ = _inputs(2, 8, 16, 3, seed=2)
    for fn in (w8a8_flat_linear, w8a8_flat_linear_reference):
        with pytest.raises((ValueError, RuntimeError), match="copies need a weight"):
            fn(x, q[:, :-1], scale, mult, step, src)
        with pytest.raises((TypeError, RuntimeError), match="int8"):
            fn(x, q.to(torch.int16), scale, mult, step, src)
    with pytest.raises(RuntimeError, match="outside"):
        w8a8_flat_linear(x, q, scale, mult, step, torch.tensor([0, 1, 99]))


def test_opcheck_and_backend():
    x, q, scale, mult, step, src, b = _inputs(3, 24, 80, 5, seed=4)
    torch.library.opcheck(w8a8_flat_linear, (x.view(1, 3, 80), q, scale, mult, step, src, b))
    torch.library.opcheck(w8a8_flat_linear, (x[:1], q, scale, mult, step, src, None))
    if ops.status().extension.startswith("loaded"):
        assert ops.status()["w8a8_flat_linear"]["cpu"].startswith("c++")
