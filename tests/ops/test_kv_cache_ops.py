"""infertrix::kv_gather / kv_quantize / kv_dequantize(_into) / kivi_decode_attention: compiled
kernels against the references."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops.kivi_attention import kivi_decode_attention, kivi_decode_attention_reference
from infertrix.ops.kv_cache_ops import (
    kv_dequantize,
    kv_dequantize_into,
    kv_dequantize_into_reference,
    kv_dequantize_reference,
    kv_gather,
    kv_gather_reference,
    kv_quantize,
    kv_quantize_reference,
)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 17, 64), (1, 9, 100, 24), (3, 2, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_matches_reference(isa, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(dtype)
    b, h, s, _ = shape
    k = max(1, s // 2)
    idx = torch.stack(
        [torch.randperm(s, generator=g)[:k].sort().values for _ in range(b * h)]
    ).view(b, h, k)
    assert torch.equal(kv_gather(x, idx), kv_gather_reference(x, idx))


def test_gather_rejects_bad_index():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        kv_gather(x, torch.tensor([[[0, 4]]]))
    with pytest.raises((TypeError, RuntimeError), match="int64"):
        kv_gather(x, torch.tensor([[[0, 1]]], dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(
    ("shape", "group"),
    [((4, 64), 32), ((2, 3, 5, 32), 32), ((7, 16), 16), ((3, 128), 64), ((1, 8), 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_dequantize_match_reference_bit_for_bit(isa, bits, shape, group, dtype):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    x = (torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 5).to(dtype)
    got = kv_quantize(x, bits, group)
    ref = kv_quantize_reference(x, bits, group)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(kv_dequantize(*got, bits, group), kv_dequantize_reference(*ref, bits, group))


@pytest.mark.parametrize("seed", range(10))
def test_dequantize_many_seeds(isa, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 256, generator=g) * 3
    for bits in (2, 4):
        q = kv_quantize_reference(x, bits, 32)
        assert torch.equal(kv_dequantize(*q, bits, 32), kv_dequantize_reference(*q, bits, 32))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantization_error_is_within_half_a_step(bits):
    x = torch.randn(50, 64)
    packed, scale, zero = kv_quantize_reference(x, bits, 16)
    assert packed.shape == (50, 64 * bits // 8) and scale.shape == (50, 4)
    back = kv_dequantize_reference(packed, scale, zero, bits, 16)
    step = scale.repeat_interleave(16, dim=-1)
    assert torch.all((back - x).abs() <= step / 2 + 1e-5)


def test_constant_group_is_exact():
    x = torch.full((2, 32), 0.75)
    back = kv_dequantize_reference(*kv_quantize_reference(x, 2, 32), 2, 32)
    assert torch.equal(back, x)


def test_opcheck():
    x = torch.randn(2, 3, 6, 16)
    idx = torch.tensor([[[0, 2, 5]] * 3] * 2)
    torch.library.opcheck(kv_gather, (x, idx))
    torch.library.opcheck(kv_quantize, (torch.randn(3, 64), 4, 32))
    q = kv_quantize(torch.randn(3, 64), 2, 16)
    torch.library.opcheck(kv_dequantize, (*q, 2, 16))
    q4 = kv_quantize(torch.randn(1, 1, 3, 64), 2, 16)
    torch.library.opcheck(kv_dequantize_into, (*q4, 2, 16, False, torch.empty(1, 1, 3, 64)))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("b", "h", "nblk", "d", "g"), [(1, 3, 4, 64, 32), (2, 2, 3, 16, 8)])
def test_dequantize_into_a_reused_buffer_matches_reference(isa, bits, b, h, nblk, d, g):
    """Keys (per channel, written transposed) and values (per token) into a slice of a larger buffer."""
    gen = torch.Generator().manual_seed(bits + d)
    s = nblk * g
    keys = torch.randn(b, h, s, d, generator=gen) * 2
    kt = keys.reshape(b, h, nblk, g, d).transpose(-1, -2).contiguous()
    qk = kv_quantize_reference(kt, bits, g)
    qv = kv_quantize_reference(torch.randn(b, h, s, d, generator=gen), bits, min(g, d))
    for codes, group, per_channel in ((qk, g, True), (qv, min(g, d), False)):
        got = torch.full((b, h, s + 5, d), float("nan"))
        ref = torch.full((b, h, s + 5, d), float("nan"))
        kv_dequantize_into(*codes, bits, group, per_channel, got[:, :, :s])
        kv_dequantize_into_reference(*codes, bits, group, per_channel, ref[:, :, :s])
        assert torch.equal(got[:, :, :s], ref[:, :, :s])
        assert got[:, :, s:].isnan().all()  # nothing written past the slice
    back = torch.empty(b, h, s, d)
    kv_dequantize_into(*qk, bits, g, True, back)
    flat = kv_dequantize_reference(*qk, bits, g).transpose(-1, -2).reshape(b, h, s, d)
    assert torch.equal(back, flat)


def test_dequantize_into_rejects_a_mismatched_buffer():
    qv = kv_quantize_reference(torch.randn(1, 2, 8, 16), 4, 16)
    with pytest.raises((ValueError, RuntimeError), match="match|float32"):
        kv_dequantize_into(*qv, 4, 16, False, torch.empty(1, 2, 9, 16))
    with pytest.raises((ValueError, RuntimeError), match="float32"):
        kv_dequantize_into(*qv, 4, 16, False, torch.empty(1, 2, 8, 16, dtype=torch.bfloat16))


def test_bad_quantization_arguments():
    with pytest.raises((ValueError, RuntimeError), match="bits=2 or 4"):
        kv_quantize(torch.randn(2, 8), 3, 8)
    with pytest.raises((ValueError, RuntimeError), match="multiple of group_size"):
        kv_quantize(torch.randn(2, 10), 4, 4)


def test_status_reports_the_ops():
    st = ops.status()
    for name in (
        "kv_gather",
        "kv_quantize",
        "kv_dequantize",
        "kv_dequantize_into",
        "kivi_decode_attention",
    ):
        assert st[name]["cpu"].startswith("c++/") if st.cpu_isa else st[name]["cpu"] == "reference"


def kivi_case(b, h, g, d, nblk, t, r, bits, vgroup, padded=False, dtype=torch.float32, seed=0):
    """Arguments of kivi_decode_attention for random KV quantized the way KIVIStore stores it."""
    gen = torch.Generator().manual_seed(seed)
    s = nblk * t
    keys = torch.randn(b, h, s, d, generator=gen) * 2
    kt = keys.reshape(b, h, nblk, t, d).transpose(-1, -2).contiguous()
    qk = kv_quantize_reference(kt, bits, t)
    qv = kv_quantize_reference(torch.randn(b, h, s, d, generator=gen), bits, vgroup)
    query = torch.randn(b, h * g, d, generator=gen).to(dtype)
    res = [torch.randn(b, h, r, d, generator=gen).to(dtype) for _ in range(2)]
    mask = None
    if padded:  # row 0 left-padded by 5 tokens
        mask = torch.zeros(b, s + r)
        mask[0, :5] = float("-inf")
    return (query, *qk, *qv, *res, mask, bits, d**-0.5)


KIVI_CASES = [  # (B, H_kv, query heads per KV head, D, key blocks, tokens per block, residual, value group)
    (1, 3, 3, 64, 5, 32, 7, 32),  # GQA 9/3 (SmolLM2's shape), an odd number of blocks
    (2, 3, 3, 64, 3, 32, 5, 32),
    (2, 2, 1, 16, 3, 8, 3, 8),  # no GQA, blocks smaller than one 16-byte load
    (1, 1, 9, 24, 3, 20, 0, 12),  # no residual, groups that are not multiples of 16
    (1, 2, 5, 128, 1, 64, 33, 64),  # 5 heads per KV head: a tile of 4 and one of 1
    (2, 2, 3, 24, 5, 4, 3, 8),  # rows of 1-2 bytes sharing loads, a last load only partly filled
]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case", KIVI_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_kivi_decode_attention_matches_reference(isa, bits, case, padded):
    b, h, g, d, nblk, t, r, vgroup = case
    args = kivi_case(b, h, g, d, nblk, t, r, bits, vgroup, padded=padded and b > 1)
    got = kivi_decode_attention(*args)
    ref = kivi_decode_attention_reference(*args)
    assert got.shape == (b, h * g, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_kivi_decode_attention_equals_dequantize_then_sdpa():
    """The reference is plain attention over the dequantized tokens followed by the residual."""
    args = kivi_case(2, 3, 3, 64, 3, 32, 5, 4, 32, padded=True)
    query, kc, ks, kz, vc, vs, vz, rk, rv, mask, bits, scaling = args
    keys = kv_dequantize_reference(kc, ks, kz, bits, 32).transpose(-1, -2).reshape(2, 3, 96, 64)
    values = kv_dequantize_reference(vc, vs, vz, bits, 32)
    k, v = torch.cat([keys, rk], 2), torch.cat([values, rv], 2)
    want = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scaling, enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(kivi_decode_attention(*args), want, rtol=1e-4, atol=1e-5)


def test_kivi_decode_attention_bfloat16_and_opcheck():
    args = kivi_case(1, 3, 3, 64, 3, 32, 5, 4, 32, dtype=torch.bfloat16)
    got = kivi_decode_attention(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, kivi_decode_attention_reference(*args), rtol=2e-2, atol=2e-2)
    torch.library.opcheck(kivi_decode_attention, kivi_case(2, 2, 3, 16, 2, 8, 3, 2, 8, padded=True))
    torch.library.opcheck(kivi_decode_attention, kivi_case(1, 1, 1, 16, 1, 8, 0, 4, 16))
