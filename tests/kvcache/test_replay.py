"""replay(record_prefill(...)) builds exactly the cache a real prefill under the policy builds."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.kvcache import (
    H2O,
    KIVI,
    DensityKV,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    new_cache,
)
from infertrix.kvcache.replay import record_prefill, replay


@pytest.mark.parametrize(
    "policy",
    [
        SnapKV(window_size=4, compression=0.5),
        H2O(budget=10),
        StreamingLLM(compression=0.75),
        PyramidKV(window_size=4, compression=0.5),
        DensityKV(window_size=4, compression=0.5),
    ],
    ids=lambda p: type(p).__name__,
)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_replay_equals_real_prefill(arch, policy):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ix.optimize(model, policy, KIVI(bits=4, group_size=4, residual_length=4))
    real = new_cache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=real)
    rec = record_prefill(model, ids, mask)
    cache = replay(model, rec, policy, KIVI(bits=4, group_size=4, residual_length=4))
    assert cache.stored_lengths() == real.stored_lengths()
    for a, b in zip(cache.layers, real.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    nxt = torch.tensor([[5], [6]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        x = model(nxt, attention_mask=mask2, cache=real).logits
        y = model(nxt, attention_mask=mask2, cache=cache).logits
    assert torch.equal(x, y)
