"""infertrix::w8a8_flat_linear (FlattenQuant's per-tensor static int8): kernels against the reference."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops.w8a8 import MAX_ROWS
from infertrix.ops.w8a8_flat import (
    MAX_EXTRA,
    pair_columns,
    unpair_columns,
    w8a8_flat_linear,
    w8a8_flat_linear_reference,
)

# (M, N, K, F): one row, tiny K, a byte tail, every row-chunk size, past the row limit, SmolLM2-like
SHAPES = [(1, 7, 5, 2), (1, 49, 576, 12), (2, 33, 17, 0), (3, 100, 31, 5), (5, 9, 577, 30), (8, 16, 33, 1),
          (9, 23, 130, 7), (MAX_ROWS, 37, 96, 3), (MAX_ROWS + 3, 21, 70, 9), (1, 576, 1536, 30),
          (3, 40, 300, 150)]  # many flattened channels


def _inputs(m: int, n: int, k: int, f: int, seed: int):
    """x, qweight, scale, act_scale, mult, flat_index, flat_columns, bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g) * 3
    channels = torch.randperm(k, generator=g)[: min(f, k)].sort().values
    copies = torch.randint(2, 65, (channels.numel(),), generator=g)
    mult = torch.cat([torch.tensor([20.0]), 20.0 / copies.float()])
    x[:, channels] *= copies.float()  # the flattened channels carry the large values
    if k > 2:
        x[0, 1] = 0.0
        x[0, 2] = 42.5 / 20.0 if 2 not in channels.tolist() else x[0, 2]  # a half-way value: rounds to even
        x[0, 3 % k] = 40.0  # beyond +-127 after the multiplier: clipped (unless flattened)
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-4
    cols = pair_columns(q[:, channels].t())
    index = torch.stack([channels, copies - 1])
    return x, q, scale, torch.tensor([0.03]), mult, index, cols, torch.randn(n, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_bit_for_bit(isa, shape):
    x, *args, b = _inputs(*shape, seed=sum(shape))
    for bias in (b, None):
        y = w8a8_flat_linear(x, *args, bias)
        assert y.shape == (shape[0], shape[1])
        assert torch.equal(y, w8a8_flat_linear_reference(x, *args, bias)), (isa, shape)


def test_rows_independent_dtypes_and_leading_dims():
    x, *args, b = _inputs(6, 40, 72, 4, seed=1)
    full = w8a8_flat_linear(x, *args, b)
    for i in range(6):
        assert torch.equal(w8a8_flat_linear(x[i : i + 1], *args, b)[0], full[i])
    x3 = x.view(2, 3, 72)
    assert torch.equal(w8a8_flat_linear(x3, *args, b), full.view(2, 3, 40))
    for dt in (torch.bfloat16, torch.float16):
        y = w8a8_flat_linear(x3.to(dt), *args, b.to(dt))
        assert y.dtype == dt
        assert torch.equal(y, w8a8_flat_linear_reference(x3.to(dt), *args, b.to(dt)))


def test_flattening_is_exact_when_nothing_clips():
    """A channel split into m copies of x / m with its column repeated: the same integer product."""
    k, n = 8, 5
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    x = torch.arange(1, k + 1, dtype=torch.float32)[None] * 3  # channel 7 carries 24: flattened 3 ways
    copies = torch.ones(k, dtype=torch.long)
    copies[7] = 3
    ch = torch.tensor([7])
    y = w8a8_flat_linear(x, w, torch.ones(n), torch.ones(1), torch.tensor([1.0, 1 / 3]), torch.tensor([[7], [2]]),
                         pair_columns(w[:, ch].t()))
    assert torch.equal(y, (x @ w.float().t()))


def test_equals_the_appended_copies_layout():
    """The correction form gives the bits of the paper's form: the copies appended as real channels
    (their codes repeated, the weight columns repeated) through per-channel int8 arithmetic."""
    x, q, scale, step, mult, index, cols, b = _inputs(4, 30, 50, 6, seed=7)
    per_channel = mult[0].repeat(50)
    per_channel[index[0]] = mult[1:]
    src = torch.repeat_interleave(index[0], index[1])
    codes = torch.round(x * per_channel).clamp(-127, 127)
    wide = torch.cat([codes, codes[:, src]], 1).double() @ torch.cat([q, q[:, src]], 1).double().t()
    expect = (wide.to(torch.int32).float() * step) * scale + b
    assert torch.equal(w8a8_flat_linear(x, q, scale, step, mult, index, cols, b), expect)


def test_bad_inputs_raise_clear_errors():
    x, q, scale, step, mult, index, cols, _ = _inputs(2, 8, 16, 3, seed=2)
    for fn in (w8a8_flat_linear, w8a8_flat_linear_reference):
        with pytest.raises((ValueError, RuntimeError), match="needs a weight"):
            fn(x, q[:, :-1], scale, step, mult, index, cols)
        with pytest.raises((TypeError, RuntimeError), match="int8"):
            fn(x, q.to(torch.int16), scale, step, mult, index, cols)
        with pytest.raises((ValueError, RuntimeError), match="flat_columns"):
            fn(x, q, scale, step, mult, index, cols[:, :-1])
        with pytest.raises((ValueError, RuntimeError), match="flat_columns"):
            fn(x, q, scale, step, mult, index, cols[..., :1])
        with pytest.raises((ValueError, RuntimeError), match="mult"):
            fn(x, q, scale, step, mult[:-1], index, cols)
        with pytest.raises((ValueError, RuntimeError), match="act_scale"):
            fn(x, q, scale, step.double(), mult, index, cols)
        with pytest.raises((ValueError, RuntimeError), match="scale must be float32"):
            fn(x, q, scale[:-1], step, mult, index, cols)
        with pytest.raises((ValueError, RuntimeError), match="bias"):
            fn(x, q, scale, step, mult, index, cols, torch.zeros(3))
        for bad in ([[0, 1, 99], [1, 1, 1]], [[0, 1, 1], [1, 1, 1]], [[0, 1, 2], [1, -1, 1]],
                    [[0, 1, 2], [1, MAX_EXTRA + 1, 1]]):
            with pytest.raises((ValueError, RuntimeError), match="flat_index"):
                fn(x, q, scale, step, mult, torch.tensor(bad), cols)


def test_opcheck_and_backend():
    x, q, scale, step, mult, index, cols, b = _inputs(3, 24, 80, 5, seed=4)
    torch.library.opcheck(w8a8_flat_linear, (x.view(1, 3, 80), q, scale, step, mult, index, cols, b))
    torch.library.opcheck(w8a8_flat_linear, (x[:1], q, scale, step, mult[:1], index[:, :0], cols[:, :0], None))


def test_column_pairs_round_trip():
    cols = torch.randint(-127, 128, (5, 19), dtype=torch.int8)
    tiles = pair_columns(cols)
    assert tiles.shape == (2, 3, 16, 2) and torch.equal(tiles[1, 1, 2], cols[2:4, 18])
    assert (tiles[:, 2, :, 1] == 0).all() and (tiles[1, :, 3:] == 0).all()
    assert torch.equal(unpair_columns(tiles, 5, 19), cols)
    if ops.status().extension.startswith("loaded"):
        assert ops.status()["w8a8_flat_linear"]["cpu"].startswith("c++")


def test_the_int16_multiplier_bound(isa):
    """MAX_EXTRA extra copies of a code at +-127 is the largest int16 multiplier: exact there."""
    x, q, scale, step, mult, index, cols, b = _inputs(2, 24, 40, 3, seed=9)
    index[1] = MAX_EXTRA
    x[:, index[0]] = torch.tensor([1e6, -1e6, 1e6])  # codes clamp to +-127
    assert torch.equal(w8a8_flat_linear(x, q, scale, step, mult, index, cols, b),
                       w8a8_flat_linear_reference(x, q, scale, step, mult, index, cols, b))


# K = 4096: a task per tile of 16 outputs; N = 325: more than one task of 16 tiles past MAX_ROWS rows
@pytest.mark.parametrize("n, k", [(50, 96), (16 * 9 + 5, 4096), (16 * 20 + 5, 96)])
def test_thread_count_changes_no_bit(n, k):
    x, *args, b = _inputs(MAX_ROWS + 9, n, k, 7, seed=11)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w8a8_flat_linear(x, *args, b)
        assert torch.equal(one, w8a8_flat_linear_reference(x, *args, b))
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(w8a8_flat_linear(x, *args, b), one), threads
            assert torch.equal(w8a8_flat_linear(x[:7], *args, b), one[:7]), threads
            assert torch.equal(w8a8_flat_linear(x[:1], *args, b), one[:1]), threads
    finally:
        torch.set_num_threads(before)
