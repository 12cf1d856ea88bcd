"""AdaKV: the layer's budget shared over its KV heads by their pooled scores (with a floor per head),
stored at the largest head's count with the rest hidden per head: hidden slots are invisible to
attention, alpha=1 is SnapKV, the bytes are the storage held, a padded batch of 4 decodes as its rows
alone, decode-time compression is refused, and the composition with another scorer (KVzip) works."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_rows_decode_as_alone, left_padded, make_tiny

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import TOVA, AdaKV, AdaKVzip, KVzip, SnapKV, new_cache
from infertrix.kvcache.adakv import HeadBudgets, head_budgets
from infertrix.kvcache.policy_cache import HIDDEN
from infertrix.kvcache.replay import record_prefill, replay


def prompt(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_concentrated_heads_give_budget_to_spread_ones_above_a_floor():
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, 0] = 1.0  # head 0: all attention on one token
    scores[0, 0, 1:] = 0.001
    scores[0, 1] = torch.linspace(0.2, 0.1, 10)  # head 1: spread over every token
    assert head_budgets(scores, 4, 0.0).tolist() == [[1, 7]]
    assert head_budgets(scores, 4, 0.5).tolist() == [[2, 6]]  # the floor: half the uniform budget
    assert head_budgets(scores, 4, 1.0).tolist() == [[4, 4]]  # alpha 1: uniform
    # pads (-inf) never count: a row with fewer tokens than the budget keeps them all in every head
    padded = torch.cat([torch.full((1, 2, 5), float("-inf")), scores[..., :3]], -1)
    assert head_budgets(padded, 4, 0.2).tolist() == [[3, 3]]


def compressed(model, policy, ids):
    ix.restore(model)
    ix.optimize(model, policy)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache


def test_alpha_one_keeps_what_snapkv_keeps():
    model = make_tiny("llama")
    ids = prompt(0, 40)
    ada = compressed(model, AdaKV(budget=12, window_size=4, kernel_size=3, alpha=1.0), ids)
    snap = compressed(model, SnapKV(budget=12, window_size=4, kernel_size=3), ids)
    for a, s, state in zip(ada.layers, snap.layers, ada.states, strict=True):
        assert torch.equal(a.keys, s.keys) and torch.equal(a.values, s.values)
        assert HIDDEN not in state.aux  # nothing hidden: no mask (the engine can run the cache)


def test_storage_is_the_largest_heads_budget_and_is_what_bytes_count():
    model = make_tiny("llama")
    ids = prompt(1, 60)
    ada = compressed(model, AdaKV(budget=12, window_size=4, kernel_size=3), ids)
    snap = compressed(model, SnapKV(budget=12, window_size=4, kernel_size=3), ids)
    for layer, state in zip(ada.evicting_layers, ada.states, strict=True):
        shown = (~state.aux[HIDDEN]).sum(-1)  # [B, H_kv] tokens each head attends
        assert int(shown.sum()) == 12 * 2  # the layer's total budget, shared unevenly
        assert layer.keys.shape[-2] == int(shown.max()) > 12
    assert ada.kv_bytes() > snap.kv_bytes()  # the storage held, not the budget's share
    assert ada.state_bytes() == sum(s.aux[HIDDEN].nbytes for s in ada.states)


def test_hidden_slots_are_invisible_to_attention_on_the_engine_and_the_module_path():
    from infertrix.engine import engine_runtime

    model = make_tiny("llama")
    cache = compressed(model, AdaKV(budget=12, window_size=4, kernel_size=3), prompt(2, 50, batch=2))
    assert cache.engine_refusal(1) is None  # the engine's attention takes the mask per KV head
    nxt = torch.tensor([[5], [6]])
    with torch.no_grad():
        want = model(nxt, cache=copy.deepcopy(cache)).logits
        assert engine_runtime(model).last == "engine"
        module = model(nxt, cache=copy.deepcopy(cache), output_hidden_states=True).logits
        assert engine_runtime(model).last.startswith("module")
        torch.testing.assert_close(module, want, rtol=1e-5, atol=1e-5)
        for layer, state in zip(cache.evicting_layers, cache.states, strict=True):
            hidden = state.aux[HIDDEN][..., None]  # garbage in every hidden slot changes nothing
            layer.keys.copy_(torch.where(hidden, torch.randn_like(layer.keys) * 100, layer.keys))
            layer.values.copy_(torch.where(hidden, torch.randn_like(layer.values) * 100, layer.values))
        assert torch.equal(model(nxt, cache=copy.deepcopy(cache)).logits, want)
        layer = cache.evicting_layers[0]  # ... while a shown one does
        shown = ~cache.states[0].aux[HIDDEN][..., None]
        layer.values.copy_(torch.where(shown, layer.values + 1, layer.values))
        assert not torch.allclose(model(nxt, cache=cache).logits, want)


def test_left_padded_batch_of_four_decodes_as_its_rows_alone():
    model = make_tiny("llama")
    ix.optimize(model, AdaKV(budget=12, window_size=4, kernel_size=3))
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in (28, 17, 22, 19)]
    batch, mask = left_padded(rows)
    assert_rows_decode_as_alone(model, batch, mask, rows, 10)


def test_replay_then_an_uncompressed_question_as_ruler_runs_it():
    """record_prefill + replay, then the question fed with the policy removed from the cache (the RULER
    benchmark's question-agnostic protocol): the hidden slots stay hidden."""
    model = make_tiny("llama")
    policy = AdaKV(compression=0.5, window_size=4, kernel_size=3)
    ids = prompt(5, 40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ix.optimize(model, policy)
    real = new_cache(model)
    question = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=real)
        cache = replay(model, record_prefill(model, ids, mask), policy)
        assert cache.stored_lengths() == real.stored_lengths()
        real.policy = cache.policy = None
        a = model(question, attention_mask=full_mask, cache=real).logits
        b = model(question, attention_mask=full_mask, cache=cache).logits
    assert torch.equal(a, b)


@dataclass
class AdaTOVA(HeadBudgets, TOVA):
    """The composition the module docstring describes, on another scorer."""


def shown_counts(layer, state) -> torch.Tensor:
    """[B, H_kv] tokens each head attends: the stored ones, less those hidden (no mask: none hidden)."""
    if HIDDEN not in state.aux:
        return torch.full(layer.keys.shape[:2], layer.keys.shape[-2])
    return (~state.aux[HIDDEN]).sum(-1)


@pytest.mark.parametrize("cls", [AdaKVzip, AdaTOVA])
def test_head_budgets_sit_on_any_scorer(cls):
    model = make_tiny("llama")
    extra = {"sink_tokens": 2} if cls is AdaKVzip else {}
    cache = compressed(model, cls(budget=12, **extra), prompt(7, 40))
    for layer, state in zip(cache.evicting_layers, cache.states, strict=True):
        shown = shown_counts(layer, state)
        assert int(shown.sum()) == 12 * 2 and layer.keys.shape[-2] == int(shown.max())


def test_adakvzip_alpha_one_keeps_what_kvzip_keeps_and_a_padded_batch_decodes_as_alone():
    model = make_tiny("llama")
    ids = prompt(3, 40)
    ada = compressed(model, AdaKVzip(budget=12, sink_tokens=2, alpha=1.0), ids)
    zip_ = compressed(model, KVzip(budget=12, sink_tokens=2), ids)
    for a, z in zip(ada.layers, zip_.layers, strict=True):
        assert torch.equal(a.keys, z.keys) and torch.equal(a.values, z.values)
    ix.restore(model)
    ix.optimize(model, AdaKVzip(budget=12, sink_tokens=2))
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in (28, 17, 22, 19)]
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 6)


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="alpha must be in"):
        AdaKV(alpha=1.5)
    with pytest.raises(ConfigError, match="does not merge"):
        AdaKV(merge=True)
