"""Rollback through a compressing KV cache of the kvcache family: speculative greedy decoding with a
cache policy gives exactly what ``generate`` gives with the same policy and no speculation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_spec_greedy_identity import padded_batch

import infertrix as ix
from infertrix.core.transform import UnsupportedModelError

LENGTHS = (90, 73, 81, 60)  # long enough for the policies' budgets to evict


@pytest.mark.parametrize("policy", ["snapkv:0.5", "streaming_llm", "h2o:0.5"])
@pytest.mark.parametrize("drafter", ["pld", "quantized_self"])
def test_greedy_identity_with_cache_policy(policy, drafter):
    model = make_tiny("llama")
    ids, mask = padded_batch(1, seed=3, lengths=LENGTHS)
    ix.optimize(model, policy)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    ix.restore(model)
    spec = ix.speculative.PromptLookup(num_tokens=6, adaptive=False) if drafter == "pld" else (
        ix.speculative.QuantizedSelf(group_size=32, adaptive=False))
    ix.optimize(model, policy, spec)
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
        stats = ix.speculative.speculative_stats(model).last
    finally:
        ix.restore(model)
    assert torch.equal(ref, out)
    assert stats.drafted > stats.accepted > 0  # drafts were kept and rejected ones rolled back


def test_cache_policy_at_batch_4_is_refused_clearly():
    model = make_tiny("llama")
    ids, mask = padded_batch(4, seed=3, lengths=LENGTHS)
    ix.optimize(model, "snapkv:0.5", "pld")
    with pytest.raises(UnsupportedModelError, match="batch size 1 only"):
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
