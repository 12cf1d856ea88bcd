"""growing_kv: the full cache in buffers with headroom, bit-identical to transformers' default."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from transformers.cache_utils import DynamicCache, DynamicLayer

import infertrix as ix
from infertrix.kvcache import GrowingCache, GrowingKV, GrowingLayer


def gen(model, ids, **kw):
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True,
          "output_scores": True, **kw}
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.mark.parametrize("engine", ["engine(enabled=false)", "engine"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_bit_identical_padded_batch(arch, engine):
    """Against the same model without GrowingKV, on each decode path (the engine is the default)."""
    plain = make_tiny(arch)
    grown = copy.deepcopy(plain)
    ix.optimize(plain, engine)
    ix.optimize(grown, GrowingKV(min_headroom=4), engine)  # small headroom: several growths during the run
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    a, b = gen(plain, ids, attention_mask=mask), gen(grown, ids, attention_mask=mask)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    assert isinstance(b.cache, GrowingCache)
    layer = b.cache.layers[0]
    assert isinstance(layer, GrowingLayer) and 2 <= layer.reallocations < 20  # grew, but not per token
    assert layer.kbuf.shape[-2] >= layer.keys.shape[-2] == b.cache.get_seq_length()


def test_beam_search_and_cache_reuse_identical():
    plain = make_tiny("llama")
    grown = copy.deepcopy(plain)
    ix.optimize(grown, "growing_kv")
    ids = torch.randint(3, 128, (2, 6))
    a = gen(plain, ids, num_beams=3).sequences
    b = gen(grown, ids, num_beams=3).sequences  # beam reordering replaces keys: buffers re-made
    assert torch.equal(a, b)
    # reuse one cache across two generate calls (the second continues the first)
    ca, cb = DynamicCache(config=plain.config), GrowingCache(grown.config, min_headroom=2)
    first_a = plain.generate(ids, max_new_tokens=5, do_sample=False, cache=ca, pad_token_id=0)
    first_b = grown.generate(ids, max_new_tokens=5, do_sample=False, cache=cb, pad_token_id=0)
    more = torch.cat([first_a, torch.randint(3, 128, (2, 3))], 1)
    assert torch.equal(
        plain.generate(more, max_new_tokens=6, do_sample=False, cache=ca, pad_token_id=0),
        grown.generate(more, max_new_tokens=6, do_sample=False, cache=cb, pad_token_id=0),
    )
    assert torch.equal(first_a, first_b)


def test_crop_then_update_matches_dynamic_layer():
    g, d = GrowingLayer(min_headroom=3), DynamicLayer()
    for step, n in enumerate([5, 1, 1, 4, 1, 1, 1]):
        k, v = torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)
        ok, ov = g.update(k, v)
        rk, rv = d.update(k, v)
        assert torch.equal(ok, rk) and torch.equal(ov, rv)
        if step in (3, 5):  # speculative rollback: drop the last tokens, then append others
            g.crop(-2)
            d.crop(-2)
            assert torch.equal(g.keys, d.keys) and g.get_seq_length() == d.get_seq_length()


def test_sliding_layers_stay_stock_and_policies_take_precedence():
    gemma = make_tiny("gemma3")
    cache = GrowingCache(gemma.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "GrowingLayer" in kinds and any("Sliding" in k for k in kinds)
    model = make_tiny("llama")
    ix.optimize(model, GrowingKV(), ix.kvcache.SnapKV(compression=0.5))
    out = gen(model, torch.randint(3, 128, (1, 100)), max_new_tokens=2)
    assert isinstance(out.cache, ix.kvcache.PolicyCache)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ix.ConfigError, match="headroom"):
        GrowingKV(headroom=-1)
