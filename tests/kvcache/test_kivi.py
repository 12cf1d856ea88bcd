"""KIVI KV quantization: storage, accuracy, composition with eviction."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.eval import kv_cache_bytes
from infertrix.kvcache import KIVI, CacheCropError, SnapKV, new_cache


def run(model, ids):
    cache = new_cache(model)
    out = model(ids, cache=cache)
    nxt = out.logits[:, -1:].argmax(-1)
    step = model(
        nxt, cache=cache
    )  # the prompt is read back from the quantized store here
    return cache, step.logits[:, -1]


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_stores_few_bits_behind_a_residual_window(bits):
    model = make_tiny(
        "llama", head_dim=32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    ix.optimize(model, KIVI(bits=bits, group_size=8, residual_length=8))
    ids = torch.randint(3, 128, (2, 50))
    cache, _ = run(model, ids)
    layer = cache.layers[0]
    # 51 tokens: 40 quantized in blocks of 8, 11 in full precision (8 <= residual < 8 + 8)
    assert layer.n_quantized == 40 and layer.residual_len == 11 and cache.get_seq_length() == 51
    assert layer.codes.keys[0].dtype == torch.uint8 and layer.codes.keys[0].shape == (
        2,
        2,
        5,
        32,
        8 * bits // 8,
    )
    # per (row, KV head): packed codes + a float32 scale and zero per group + the fp32 residual
    codes = 2 * 40 * 32 * bits // 8
    groups = 5 * 32 + 40 * (
        32 // 8
    )  # key groups (block, channel) + value groups (token, 8 channels)
    # the fp32 residual's append buffer: its 11 tokens + one group (8) of headroom, all allocated
    per_head = codes + groups * 2 * 4 + (11 + 8) * 32 * 4 * 2
    assert cache.kv_bytes() == 4 * 2 * 2 * per_head  # 4 layers, batch 2, 2 KV heads
    assert cache.kv_bytes() < cache.full_kv_bytes()
    assert kv_cache_bytes(cache) == cache.kv_bytes()  # the codes are counted, not only the residual


def test_kivi_4bit_is_closer_than_2bit():
    model = make_tiny(
        "llama", head_dim=32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    ids = torch.randint(3, 128, (1, 60))
    _, ref = run_plain(model, ids)
    errs = {}
    for bits in (4, 2):
        ix.restore(model)
        ix.optimize(model, KIVI(bits=bits, group_size=8, residual_length=8))
        _, logits = run(model, ids)
        errs[bits] = (logits - ref).abs().max().item()
    assert 0 < errs[4] < errs[2]


def run_plain(model, ids):
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    return None, model(nxt, cache=out.cache).logits[:, -1]


def test_kivi_composes_with_eviction():
    model = make_tiny("llama")
    ix.optimize(model, "snapkv:0.5(window_size=4),kivi:4(group_size=8,residual_length=8)")
    ids = torch.randint(3, 128, (1, 64))
    cache, logits = run(model, ids)
    layer = cache.layers[0]
    assert (
        layer.stored_length == 33 and layer.n_quantized == 24
    )  # 32 kept + 1 decoded; 24 quantized
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 69)
    rep = ix.describe(model).transforms
    assert any("kv_bytes" in t["report"] for t in rep)


def test_kivi_crop_within_the_residual_only():
    model = make_tiny("llama")
    ix.optimize(model, KIVI(bits=4, group_size=8, residual_length=8))
    cache = new_cache(model)
    model(torch.randint(3, 128, (1, 40)), cache=cache)
    model(torch.tensor([[5, 6]]), cache=cache)
    cache.crop(-2)
    assert cache.get_seq_length() == 40
    with pytest.raises(CacheCropError, match="quantized"):
        cache.crop(-30)


def test_kivi_generate_padded_batch_equals_rows_alone():
    model = make_tiny("llama")
    ix.optimize(
        model, SnapKV(window_size=4, budget=12), KIVI(bits=4, group_size=4, residual_length=4)
    )
    rows = [torch.randint(3, 128, (1, n)) for n in (20, 9)]
    batch = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, 20 - r.shape[1] :] = r[0]
        mask[i, 20 - r.shape[1] :] = 1
    out = model.generate(
        batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    for i, r in enumerate(rows):
        alone = model.generate(r, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[i, 20:], alone[0, r.shape[1] :])


def test_dequantized_view_is_one_buffer_shared_by_the_layers():
    """Attention reads the quantized tokens from one float32 buffer that every layer reuses (no
    allocation per step), holding exactly the dequantized codes followed by the residual window."""
    model = make_tiny(
        "llama", head_dim=32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    ix.optimize(model, KIVI(bits=4, group_size=8, residual_length=8))
    cache, _ = run(model, torch.randint(3, 128, (2, 50)))
    layers = cache.evicting_layers
    assert all(layer.codes.scratch is layers[0].codes.scratch for layer in layers)
    for layer in layers:
        k, v = layer.full_keys_values()
        assert torch.equal(k, torch.cat([layer.codes.dequantize_keys(k.dtype), layer.keys], dim=-2))
        assert torch.equal(v, torch.cat([layer.codes.dequantize_values(v.dtype), layer.values], dim=-2))
        assert (
            k.untyped_storage().data_ptr() == layers[0].codes.scratch["keys"].untyped_storage().data_ptr()
        )
    # the buffer holds one layer's worth of tokens (rounded up), not the whole cache
    stored = layers[0].stored_length
    assert 0 < cache.scratch_bytes() <= 2 * 2 * 2 * 32 * 4 * (stored + 256 + stored // 8)


def greedy_with_logits(model, ids, mask, steps):
    cache = new_cache(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1), cache


@pytest.mark.parametrize("bits", [2, 4])
def test_decoding_from_codes_matches_dequantize_then_sdpa(bits):
    """KIVI's attention function reads decoding steps straight from the codes (no dequantized
    buffer) and gives the logits of the dequantize + sdpa path, on a left-padded GQA batch."""
    model = make_tiny(
        "llama",
        head_dim=32,
        hidden_size=192,
        num_attention_heads=6,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    # the module path's two attention functions (the engine reads the codes with its own step)
    ix.optimize(model, KIVI(bits=bits, group_size=8, residual_length=8), "engine(enabled=false)")
    assert model.config._attn_implementation == "infertrix_kivi"
    ids = torch.randint(3, 128, (2, 41))
    mask = torch.ones_like(ids)
    ids[1, :14], mask[1, :14] = 0, 0
    fused, fused_logits, fused_cache = greedy_with_logits(model, ids, mask, 30)
    model.set_attn_implementation("sdpa")  # the same cache, dequantized then sdpa
    plain, plain_logits, plain_cache = greedy_with_logits(model, ids, mask, 30)
    assert fused_cache.scratch_bytes() == 0 < plain_cache.scratch_bytes()
    assert fused_cache.layers[0].n_quantized == plain_cache.layers[0].n_quantized > 0
    # float32 rounding (sums reassociated), amplified by a random model's logits of up to ~16
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-3, atol=1e-3)
    assert torch.equal(fused, plain)
    assert len(set(fused[0, 41:].tolist())) > 3  # a real continuation, not one repeated token


def test_kivi_restores_the_attention_implementation():
    model = make_tiny("llama")
    ix.optimize(model, KIVI(bits=4, group_size=8, residual_length=8))
    assert model.config._attn_implementation == "infertrix_kivi"
    ix.restore(model)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")  # eager models keep eager (and dequantize to attend)
    ix.optimize(model, KIVI(bits=4, group_size=8, residual_length=8))
    assert model.config._attn_implementation == "eager"
    out = model.generate(torch.randint(3, 128, (1, 40)), max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 52)
    ix.restore(model)
    assert model.config._attn_implementation == "eager"


def test_a_mask_the_kernel_does_not_model_falls_back_to_dequantize_then_sdpa():
    """kivi_attention with a per-head mask (or soft-capping, sinks) dequantizes the layer and runs
    sdpa: the same result as reading the codes."""
    from infertrix.kvcache.kivi import kivi_attention

    model = make_tiny("llama", head_dim=32, hidden_size=128, num_attention_heads=4)
    ix.optimize(model, KIVI(bits=4, group_size=8, residual_length=8))
    cache, _ = run(model, torch.randint(3, 128, (2, 50)))
    layer, attn = cache.layers[0], model.model.layers[0].self_attn
    query = torch.randn(2, 4, 1, 32)
    s = layer.stored_length

    def attend(mask):
        out, _ = kivi_attention(attn, query, layer.keys, layer.values, mask, kivi_layer=layer)
        return out

    shared = torch.ones(2, 1, 1, s, dtype=torch.bool)
    shared[1, ..., :3] = False
    from_codes = attend(shared)
    assert cache.scratch_bytes() == 0  # read from the codes
    per_head = torch.zeros(2, 4, 1, s)
    per_head[1, :, :, :3] = float("-inf")
    torch.testing.assert_close(attend(per_head), from_codes, rtol=1e-4, atol=1e-5)
    assert cache.scratch_bytes() > 0  # dequantized into the buffer
