"""Skinny (skinny_linear): float layers on infertrix::skinny_linear, shared weights, composition."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny
from torch import nn

import infertrix as ix
from infertrix.core import UnsupportedModelError
from infertrix.linear import Skinny, SkinnyLinear
from infertrix.quant import W4A8, W4A8Linear


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_same_function_same_weights(arch):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (2, 9))
    ref = logits(model, ids)
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    gen_ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    ix.optimize(model, "skinny_linear")
    swapped = [n for n, m in model.named_modules() if isinstance(m, SkinnyLinear)]
    assert len(swapped) == 4 * 7 + 1  # every projection of the 4 layers, and lm_head
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == weights  # shared, nothing copied
    assert torch.allclose(logits(model, ids), ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), gen_ref)
    ix.restore(model)
    assert not any(isinstance(m, SkinnyLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


def test_composes_with_quantization_in_any_order():
    def w4a8():  # the head stays float, for the Skinny kernel
        return W4A8(group_size=32, quantize_lm_head=False)

    for order in (("skinny_linear", w4a8()), (w4a8(), "skinny_linear")):
        model = make_tiny("llama")
        head = model.lm_head.weight
        ix.optimize(model, *order)  # applied by stage: weights first, then kernels
        assert sum(isinstance(m, W4A8Linear) for m in model.modules()) == 4 * 7
        assert isinstance(model.lm_head, SkinnyLinear)  # the float layer left over
        assert model.lm_head.weight is head  # the same tensor (a tied head stays tied)
        ix.restore(model)
        assert type(model.lm_head) is nn.Linear


def test_quantizing_a_skinny_model_replaces_its_layers():
    """A SkinnyLinear is an nn.Linear: a later quantization (e.g. QuantizedSelf's draft copy) takes it."""
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (1, 7))
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    ix.optimize(model, "skinny_linear", ix.speculative.QuantizedSelf(group_size=32))
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), plain)


def test_clear_error_without_float32_layers():
    model = make_tiny("llama").to(torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match="float32"):
        ix.optimize(model, Skinny())
