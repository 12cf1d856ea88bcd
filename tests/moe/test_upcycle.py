"""Upcycling a dense Llama into a Mixtral MoE (the benchmark model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from infertrix.core import ConfigError
from infertrix.moe.upcycle import balanced_kmeans, upcycle

IDS = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77, 90, 3]])


def test_balanced_kmeans_groups_are_equal():
    g = balanced_kmeans(torch.randn(96, 16), 8)
    assert torch.bincount(g, minlength=8).tolist() == [12] * 8


def test_copy_mode_is_the_dense_model():
    dense = make_tiny("llama")
    moe = upcycle(dense, num_experts=4, top_k=2, mode="copy")
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, dense(IDS).logits, atol=1e-4, rtol=1e-4)


def test_split_mode_experts_sum_to_the_dense_mlp():
    dense = make_tiny("llama")
    moe = upcycle(dense, num_experts=4, top_k=2, mode="split")
    x = torch.randn(5, dense.config.hidden_size)
    for dl, ml in zip(dense.model.layers, moe.model.layers, strict=True):
        ex = ml.mlp.experts
        total = sum(
            F.linear(F.silu(g) * u, ex.down_proj[e])
            for e in range(4)
            for g, u in [F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)]
        )
        torch.testing.assert_close(total / 2, dl.mlp(x), atol=1e-5, rtol=1e-4)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2


def test_upcycle_errors():
    with pytest.raises(ConfigError, match="equal experts"):
        upcycle(make_tiny("llama"), num_experts=5)
    with pytest.raises(ConfigError, match="mode must be"):
        upcycle(make_tiny("llama"), mode="merge")
