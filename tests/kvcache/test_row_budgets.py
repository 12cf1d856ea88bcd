"""Each row of a batch keeps what it keeps alone with a compression *ratio* (its budget follows its own
length, not the padded one), for every registered policy, while decoding (``decode_interval``) too:
kvcache/rows.py's lead fillers and per-head hidden slots."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_decode_as_alone, kv_policies, left_padded, make_tiny

import infertrix as ix
from infertrix.kvcache import SnapKV, new_cache


def rows_of(seed: int, *lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, n), generator=g) for n in lengths]


def name(p) -> str:
    return type(p).__name__ + (f"-interval{p.decode_interval}" if p.decode_interval else "")


# every row a prefill (>= prefill_min_tokens): with decode_interval a row shorter than that reaches its
# first compression on another schedule alone (its prompt counts as decoded tokens), see docs/kvcache.md
CASES = kv_policies(compression=0.5) + kv_policies(compression=0.6, decode_interval=3)


@pytest.mark.parametrize("policy", CASES, ids=name)
def test_a_padded_batch_with_a_ratio_decodes_as_its_rows_alone(policy):
    model = make_tiny("llama")
    ix.optimize(model, policy)
    rows = rows_of(3, 40, 17, 29, 22)
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 8)


@pytest.mark.parametrize("policy", kv_policies(compression=0.5), ids=name)
def test_a_row_shorter_than_a_prefill_is_kept_whole_as_alone(policy):
    model = make_tiny("llama")
    ix.optimize(model, policy)
    rows = rows_of(4, 30, 9)  # 9 < prefill_min_tokens: alone it is not compressed
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 5)


def prefilled_pair():
    """(model, batch, mask, cache): SnapKV at 0.5 after the prefill of a padded pair of 40 and 20 tokens."""
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, kernel_size=3, compression=0.5))
    batch, mask = left_padded(rows_of(5, 40, 20))
    cache = new_cache(model)
    with torch.no_grad():
        model(batch, attention_mask=mask, cache=cache)
    return model, batch, mask, cache


def test_rows_keep_their_own_budgets_as_fillers_and_decode_on_the_engine():
    model, batch, mask, cache = prefilled_pair()
    for layer in cache.evicting_layers:
        assert layer.stored_length == 20 and layer.lead.tolist() == [0, 10]  # 20 and 10 kept of 40 and 20
        assert layer.first_slots(cache.row_pads).tolist() == [0, 10]
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths() == [20 + 5] * 4  # the last token is not stored yet
    engine = ix.describe(model).transforms[-1]["report"]
    assert engine["engine_forwards"] == 5 and engine["last_forward"] == "engine"
    assert "filler_slots" in ix.describe(model).transforms[0]["report"]


def test_merging_a_padded_batch_merges_into_each_rows_own_tokens():
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, kernel_size=3, compression=0.5, merge=True, merge_threshold=0.0))
    rows = rows_of(6, 36, 18, 25)
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 6)


def test_pooling_and_density_of_a_padded_row_have_the_bits_of_the_row_alone():
    from infertrix.kvcache.attention import pool1d
    from infertrix.kvcache.density import tokens_for_mass

    g = torch.Generator().manual_seed(7)
    alone = torch.rand(1, 3, 37, generator=g)
    for pads in (1, 3, 10):
        padded = torch.cat([torch.rand(1, 3, pads, generator=g), alone], -1)  # pads hold anything
        visible = torch.arange(37 + pads)[None] >= pads
        pooled = pool1d(padded, 7, visible)
        assert torch.equal(pooled[..., pads:], pool1d(alone, 7)) and not pooled[..., :pads].any()
        assert tokens_for_mass(pooled, 0.9) == tokens_for_mass(pool1d(alone, 7), 0.9)


def test_row_targets_above_what_a_layer_holds_keep_what_it_holds():
    """DensityKV may give a row more than a compressed layer stores (no pads left to see): it keeps
    what is there, the other row gets fillers (found in review: keep_counts asked for 12 of 10 slots)."""
    from infertrix.kvcache import DensityKV, EvictingLayer, LayerState

    layer = EvictingLayer()
    k = torch.randn(2, 1, 10, 4)
    layer.update(k, k.clone())
    scores = torch.rand(2, 1, 10)
    DensityKV(compression=0.5, window_size=2, kernel_size=1).evict(layer, LayerState(), scores, [12, 6], None)
    assert layer.stored_length == 10 and layer.lead.tolist() == [0, 4]
    assert torch.equal(layer.keys[0], k[0])  # row 0 keeps all it held, in order


def test_fillers_alone_mask_per_row_not_per_head():
    from infertrix.kvcache.rows import hidden_slots_of

    cache = prefilled_pair()[3]
    hide = hidden_slots_of(cache.evicting_layers[0], None)
    assert hide.shape == (2, 1, 20) and hide.sum(-1).flatten().tolist() == [0, 10]  # KIVI's fused step reads it
