"""``infertrix_sdpa``: masked windows of several queries attend without expanding grouped keys and
values, with the same results as transformers' sdpa function."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import infertrix as ix
from infertrix.core.attention import (
    SDPA_ATTENTION,
    attention_implementation,
    sdpa_forward,
    use_packed_sdpa,
)


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("batch,kv_heads,groups,width,length,dtype", [
    (3, 2, 3, 5, 37, torch.bool), (1, 3, 3, 2, 9, torch.float32), (4, 1, 4, 7, 64, torch.bool), (2, 2, 2, 3, 130, torch.float32),
])
def test_packed_window_matches_transformers_sdpa(batch, kv_heads, groups, width, length, dtype):
    g = torch.Generator().manual_seed(length)
    heads, dim = kv_heads * groups, 16
    q = torch.randn(batch, heads, width, dim, generator=g)
    k_buf = torch.randn(batch, kv_heads, length + 11, dim, generator=g)  # a view of a buffer with headroom
    v_buf = torch.randn(batch, kv_heads, length + 11, dim, generator=g)
    k, v = k_buf[:, :, :length], v_buf[:, :, :length]
    keep = torch.rand(batch, 1, width, length, generator=g) > 0.3
    keep[..., -width:] = torch.ones(width, width, dtype=torch.bool).tril()
    keep[..., 0] = True
    mask = keep if dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = _Attn(groups)
    ours, _ = sdpa_forward(module, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (batch, width, heads, dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_calls_it_does_not_model_go_to_transformers():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g))
    module = _Attn(2)
    # no mask (causal fast path) and one query position: transformers' own code, bit for bit
    for args in ((q, k, v, None), (q[:, :, :1], k, v, torch.ones(2, 1, 1, 6, dtype=torch.bool))):
        assert torch.equal(sdpa_forward(module, *args)[0], sdpa_attention_forward(module, *args)[0])


def test_switch_and_undo():
    model = make_tiny("llama", attn_implementation="sdpa")
    undo = use_packed_sdpa(model)
    assert attention_implementation(model) == SDPA_ATTENTION
    undo()
    assert attention_implementation(model) == "sdpa"
    eager = make_tiny("llama", attn_implementation="eager")
    use_packed_sdpa(eager)()
    assert attention_implementation(eager) == "eager"  # other implementations are left alone


def test_speculative_transform_switches_and_restores():
    model = make_tiny("llama", attn_implementation="sdpa")
    ix.optimize(model, ix.speculative.PromptLookup())
    assert attention_implementation(model) == SDPA_ATTENTION
    ix.restore(model)
    assert attention_implementation(model) == "sdpa"
