"""GlobalKVzip: KVzip's scores ranked over all layers at once, every head of a layer keeping the same
tokens: the layers' counts (hand-checked allocation with its floor), the bytes of the uniform budget at
batch 1 with no mask, layers of different lengths, a padded batch of 4 decoding as its rows alone (the
rows' differing splits stored at the largest and said in describe()), and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_decode_as_alone, left_padded, make_tiny
from kvcache.test_adakv import compressed, prompt
from transformers import DynamicCache

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import GlobalKVzip, KVzip
from infertrix.kvcache.globalkvzip import layer_counts
from infertrix.kvcache.policy_cache import HIDDEN

NEG = float("-inf")


def test_layers_share_the_total_by_their_scores_above_a_floor():
    pooled = [torch.tensor([[5.0, 4.0, 3.0]]), torch.tensor([[1.0, 0.0]])]
    three = torch.tensor([3])
    assert layer_counts(pooled, three, 0).tolist() == [[3, 0]]  # the best three are all layer 0's
    assert layer_counts(pooled, three, 1).tolist() == [[2, 1]]  # each layer's best first
    # rows on their own: a row's pads (-inf) never count, so a short row keeps all it has
    rows = [torch.tensor([[5.0, 4.0, 3.0], [NEG, NEG, 3.0]]), torch.tensor([[1.0, 0.0], [NEG, 7.0]])]
    assert layer_counts(rows, torch.tensor([3, 3]), 0).tolist() == [[3, 0], [1, 1]]


def kept_positions(model, layer: int, ids: torch.Tensor, cache) -> list[set[int]]:
    """Per KV head of ``layer``, the prompt positions whose keys the compressed ``cache`` holds."""
    ix.restore(model)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=full)
    ref, got = full.layers[layer].keys[0], cache.layers[layer].keys[0]  # [H, S, D]
    return [{int((ref[h] == k).all(-1).nonzero()[0]) for k in got[h]} for h in range(got.shape[0])]


def test_batch_one_holds_the_uniform_budgets_bytes_with_the_same_tokens_in_every_head():
    model = make_tiny("llama")
    ids = prompt(3, 48)
    glob = compressed(model, GlobalKVzip(budget=12, sink_tokens=2), ids)
    uniform = compressed(model, KVzip(budget=12, sink_tokens=2), ids)
    lengths = glob.stored_lengths()
    assert sum(lengths) == 12 * len(lengths) and len(set(lengths)) > 1  # the total, shared unevenly
    assert glob.kv_bytes() == uniform.kv_bytes()
    assert all(HIDDEN not in st.aux for st in glob.states)  # nothing masked at batch 1
    assert min(lengths) >= 2  # the sinks (and the floor, 10% of 12 = 1) in every layer
    for layer in range(len(lengths)):
        heads = kept_positions(model, layer, ids, glob)
        assert all(h == heads[0] for h in heads) and {0, 1} <= heads[0]  # shared by the heads, sinks kept


def test_a_floor_of_the_whole_budget_is_the_uniform_budget():
    model = make_tiny("llama")
    cache = compressed(model, GlobalKVzip(budget=12, sink_tokens=2, min_ratio=1.0), prompt(4, 40))
    assert cache.stored_lengths() == [12] * len(cache.stored_lengths())


def test_a_padded_batch_decodes_as_its_rows_alone_and_says_what_the_rows_cost():
    model = make_tiny("llama")
    ix.optimize(model, GlobalKVzip(budget=12, sink_tokens=2))
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in (28, 17, 22, 19)]
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 6)
    batch, mask = left_padded(rows)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    lead = [layer.lead for layer in out.past_key_values.evicting_layers if layer.lead is not None]
    assert lead and all(int(x.min()) == 0 for x in lead)  # the widest row of a layer has none
    report = ix.describe(model).transforms[0]["report"]
    assert "largest row's count" in report["filler_slots"]
    engine = ix.describe(model).transforms[-1]["report"]
    assert engine["engine_forwards"] > 0  # fillers decode on the engine: only prefills ran on the module path
    assert all(why.startswith("a prefill chunk") for why in engine["fallbacks"]), engine["fallbacks"]


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="min_ratio must be in"):
        GlobalKVzip(min_ratio=1.5)
