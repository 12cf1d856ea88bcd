"""infertrix::w8a8_flat_linear (FlattenQuant's per-tensor static int8): kernels against the reference."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops.w8a8 import MAX_ROWS
from infertrix.ops.w8a8_flat import (
    MAX_EXTRA,
    flat_permutation,
    flat_table,
    pack_scales,
    unpack_scales,
    w8a8_flat_linear,
    w8a8_flat_linear_reference,
)

# (M, N, K, F): one row, tiny K, a byte tail, every row-chunk size, past the row limit, SmolLM2-like,
# F past 32 and 64 flattened channels (several int16 groups)
SHAPES = [(1, 7, 5, 2), (1, 49, 576, 12), (2, 33, 17, 0), (3, 100, 31, 5), (5, 9, 577, 30), (8, 16, 33, 1),
          (9, 23, 130, 7), (MAX_ROWS, 37, 96, 3), (MAX_ROWS + 3, 21, 70, 9), (1, 576, 1536, 30),
          (3, 40, 300, 150), (1, 20, 100, 70), (MAX_ROWS + 1, 20, 100, 70), (MAX_ROWS + 5, 9, 40, 0),
          (150, 30, 64, 5)]  # rows in several chunks of the flattened channels' float64 product


def _inputs(m: int, n: int, k: int, f: int, seed: int):
    """x, qweight (its columns in the kernel's order), scales (the flat table, then the weight
    scales), bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x = torch.randn(m, k, generator=g) * 3
    channels = torch.randperm(k, generator=g)[: min(f, k)].sort().values
    copies = torch.randint(2, MAX_EXTRA + 2, (channels.numel(),), generator=g)
    x[:, channels] *= copies.float()  # the flattened channels carry the large values
    if k > 2:
        x[0, 1] = 0.0
        x[0, 2] = 42.5 / 20.0 if 2 not in channels.tolist() else x[0, 2]  # a half-way value: rounds to even
        x[0, 3 % k] = 40.0  # beyond +-127 after the multiplier: clipped (unless flattened)
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-4
    return x, q, pack_scales(flat_table(1 / 20, channels, copies - 1), scale), torch.randn(n, generator=g)


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
    ch = torch.tensor([7])
    y = w8a8_flat_linear(x, w[:, flat_permutation(ch, k)], pack_scales(flat_table(1.0, ch, torch.tensor([2])),
                                                                        torch.ones(n)))
    assert torch.equal(y, (x @ w.float().t()))


@pytest.mark.parametrize("m", [1, 3, MAX_ROWS + 2])
def test_equals_the_appended_copies_layout(m):
    """The kernel gives the bits of the paper's form: the copies appended as real channels (their
    codes repeated, the weight columns repeated, in the layer's own channel order) through
    per-channel int8 arithmetic."""
    x, q, scales, b = _inputs(m, 30, 150, 70, seed=7)
    flat, scale = unpack_scales(scales, 30)
    step, channels, extra = flat[0, 0], flat[1:, 0].long(), flat[1:, 1].long()
    per_channel = flat[0, 1].repeat(150)
    per_channel[channels] = flat[1:, 2]
    src = torch.repeat_interleave(channels, extra)
    codes = torch.round(x * per_channel).clamp(-127, 127)
    wide = torch.cat([codes, codes[:, src]], 1).double() @ torch.cat([q, q[:, src]], 1).double().t()
    expect = (wide.to(torch.int32).float() * step) * scale + b
    assert torch.equal(w8a8_flat_linear(x, q[:, flat_permutation(channels, 150)], scales, b), expect)


def test_every_code_and_copy_count(isa):
    """Each flattened channel's value, copies x code, is an int16 in the kernel: every code in
    [-127, 127] at every copy count in [1, MAX_EXTRA + 1] (up to the largest value 128 x 127) gives
    the reference's bits, F = K = 255 (eight 32-channel groups, the last one short)."""
    k, n = 255, 48
    g = torch.Generator().manual_seed(5)
    channels = torch.arange(k)
    codes = torch.arange(-127, 128, dtype=torch.float32)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    for rows in (1, 2, 9):
        for shift in range(0, MAX_EXTRA + 1, 16):
            extra = (torch.arange(k) + shift) % (MAX_EXTRA + 1)
            scales = pack_scales(flat_table(1.0, channels, extra), torch.ones(n))
            x = torch.stack([codes.roll(r) * (1 + extra).float() for r in range(rows)])
            assert torch.equal(w8a8_flat_linear(x, q, scales), w8a8_flat_linear_reference(x, q, scales)), (rows, shift)


def test_bad_inputs_raise_clear_errors():
    x, q, scales, _ = _inputs(2, 8, 16, 3, seed=2)
    for fn in (w8a8_flat_linear, w8a8_flat_linear_reference):
        with pytest.raises((ValueError, RuntimeError), match="needs a weight"):
            fn(x, q[:, :-1], scales)
        with pytest.raises((TypeError, RuntimeError), match="int8"):
            fn(x, q.to(torch.int16), scales)
        for bad in (scales[:-1], scales.double(), scales[:10], scales[None]):
            with pytest.raises((ValueError, RuntimeError), match=r"scales must be float32 \[3 \(1 \+ F\) \+ 8\]"):
                fn(x, q, bad)
        with pytest.raises((ValueError, RuntimeError), match="bias"):
            fn(x, q, scales, torch.zeros(3))
        for row, col, value, match in ((3, 0, 99.0, "channels"), (3, 0, None, "channels"),
                                       (1, 0, 0.5, "channels"), (1, 0, -1.0, "channels"),
                                       (2, 1, -1.0, "extra copies"), (2, 1, 1.5, "extra copies"),
                                       (2, 1, MAX_EXTRA + 1.0, "extra copies"), (0, 0, 0.0, "step"),
                                       (0, 1, float("inf"), "step"), (2, 2, float("nan"), "multipliers"),
                                       (1, 2, -1.0, "multipliers")):
            bad = scales.clone()
            flat = unpack_scales(bad, 8)[0]
            flat[row, col] = flat[row - 1, col] if value is None else value  # None: the previous channel again
            with pytest.raises((ValueError, RuntimeError), match=match):
                fn(x, q, bad)


def test_opcheck_and_backend():
    x, q, scales, b = _inputs(3, 24, 80, 5, seed=4)
    torch.library.opcheck(w8a8_flat_linear, (x.view(1, 3, 80), q, scales, b))
    flat, scale = unpack_scales(scales, 24)
    torch.library.opcheck(w8a8_flat_linear, (x[:1], q, pack_scales(flat[:1], scale), None))
    if ops.status().extension.startswith("loaded"):
        assert ops.status()["w8a8_flat_linear"]["cpu"].startswith("c++")


def test_permutation_puts_the_flattened_channels_first():
    channels = torch.tensor([0, 2, 3, 7, 9])
    perm = flat_permutation(channels, 12)
    assert torch.equal(perm[:5], channels) and torch.equal(perm.sort().values, torch.arange(12))
    assert torch.equal(flat_permutation(torch.arange(0), 4), torch.arange(4))


# K = 4096: a task per block of 16 outputs; N = 325: several tasks; rows past MAX_ROWS too
@pytest.mark.parametrize("n, k", [(50, 96), (16 * 9 + 5, 4096), (16 * 20 + 5, 96)])
def test_thread_count_changes_no_bit(n, k):
    x, *args, b = _inputs(MAX_ROWS + 9, n, k, 70, seed=11)
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
