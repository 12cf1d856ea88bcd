"""ReduceTopK: the lossy reduced top-k equals the same model configured with fewer experts per token."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from moe_models import MOE_ARCHS, make_moe

import infertrix as ix
from infertrix.core import ConfigError, UnsupportedModelError
from infertrix.moe import ExpertOffload, ReduceTopK, offload_runtime

IDS = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77, 90, 3, 8, 11]])


def _run(model):
    with torch.no_grad():
        logits = model(IDS).logits
    return logits, model.generate(IDS, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_equals_model_configured_with_fewer_experts(arch):
    ref_logits, ref_gen = _run(make_moe(arch, num_experts_per_tok=1))  # same weights, top-1 config
    model = make_moe(arch)
    top2_logits, _ = _run(model)
    ix.optimize(model, ReduceTopK(top_k=1))
    logits, gen = _run(model)
    assert torch.equal(logits, ref_logits) and torch.equal(gen, ref_gen)
    assert (logits - top2_logits).abs().max() > 1e-3  # lossy: the outputs really change
    ix.restore(model)
    assert torch.equal(_run(model)[0], top2_logits)


def test_with_offload_a_budget_below_the_trained_top_k():
    ref_logits, ref_gen = _run(make_moe("mixtral", num_experts_per_tok=1))
    model = make_moe("mixtral")
    ix.optimize(model, "topk:1")  # first, so the offload's budget check sees top-1
    ix.optimize(model, ExpertOffload(experts_per_layer=1, prefetch=True))
    logits, gen = _run(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(gen, ref_gen)
    cache = offload_runtime(model).cache
    assert cache.capacity == 1 and cache.max_resident_per_layer() == 1
    cache.reset_stats()
    with torch.no_grad():
        model(IDS[:, :1])
    assert cache.stats().requests == model.config.num_hidden_layers  # one expert per layer and token


def test_errors():
    with pytest.raises(ConfigError, match=">= 1"):
        ReduceTopK(top_k=0)
    with pytest.raises(ConfigError, match="only reduces it"):
        ix.optimize(make_moe("olmoe"), ReduceTopK(top_k=3))
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts layers"):
        ix.optimize(make_tiny("llama"), ReduceTopK())
