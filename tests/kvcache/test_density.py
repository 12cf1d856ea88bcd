"""DensityKV: layer budgets in proportion to each layer's attention density, same total as SnapKV."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import DensityKV, SnapKV, new_cache
from infertrix.kvcache import density as density_mod
from infertrix.kvcache.density import allocate, tokens_for_mass


@pytest.mark.parametrize(
    ("weights", "total", "low", "high"),
    [([1.0, 2.0, 3.0, 4.0], 40, 2, 30), ([1.0, 100.0, 1.0], 30, 4, 12), ([0.0, 0.0], 9, 1, 9)],
)
def test_allocate_sums_to_total_within_bounds_in_weight_order(weights, total, low, high):
    got = allocate(weights, total, low, high)
    assert sum(got) == total
    assert all(low <= b <= high for b in got)
    n = len(weights)
    assert all(got[i] <= got[j] for i in range(n) for j in range(n) if weights[i] < weights[j])
    assert max(got) - min(got) <= 1 or len(set(weights)) > 1  # equal weights: an even split


def test_allocate_passes_a_capped_layer_excess_on():
    # the heavy layer would get 28 of 30 but is capped at 12: the others share the rest
    assert allocate([1.0, 100.0, 1.0], 30, 4, 12) == [9, 12, 9]


def test_tokens_for_mass_counts_the_heaviest_tokens_per_row():
    row = [[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]
    scores = torch.tensor([row, row[::-1]])  # [2, 2, 4]: each row's heads, averaged per row
    assert tokens_for_mass(scores, 0.75) == pytest.approx([(2 + 3) / 2] * 2)
    assert tokens_for_mass(scores[:, :1], 0.75) == pytest.approx([2, 3])


def test_layer_budgets_follow_density_and_keep_the_total(monkeypatch):
    seen = {"rows": []}
    real = density_mod.allocate

    def spy(weights, total, low, high):
        seen["weights"], seen["out"] = weights, real(weights, total, low, high)
        seen["rows"].append(seen["out"])
        return seen["out"]

    monkeypatch.setattr(density_mod, "allocate", spy)
    model = make_tiny("llama", num_hidden_layers=4)
    with torch.no_grad():  # sharper attention in the upper layers: fewer tokens hold its mass
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.mul_(1 + 8 * i)
            layer.self_attn.k_proj.weight.mul_(1 + 8 * i)
    ix.optimize(model, DensityKV(window_size=4, kernel_size=3, compression=0.5))
    cache = new_cache(model)
    pair = torch.randint(3, 128, (2, 40))
    model(pair, cache=cache)
    # each row is allocated on its own densities; a layer stores its largest row's count
    assert len(seen["rows"]) == 2 and all(sum(r) == 4 * 20 for r in seen["rows"])
    assert cache.stored_lengths() == [max(a, b) for a, b in zip(*seen["rows"], strict=True)]
    cache = new_cache(model)
    model(pair[:1], cache=cache)
    stored = cache.stored_lengths()
    assert stored == seen["out"]
    assert cache.state_bytes() == 0  # no recent queries left behind, even in uncompressed layers
    assert sum(stored) == 4 * 20  # the uniform budget's total: KV bytes exactly as SnapKV's
    assert len(set(stored)) > 1 and min(stored) >= 4
    w = seen["weights"]
    assert all(
        stored[i] <= stored[j] for i in range(4) for j in range(4) if w[i] < w[j]
    )  # denser layers keep more
    ix.restore(model)
    ix.optimize(model, SnapKV(window_size=4, kernel_size=3, compression=0.5))
    snap = new_cache(model)
    model(pair[:1], cache=snap)
    assert snap.kv_bytes() == cache.kv_bytes()


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="mass"):
        DensityKV(mass=0.0)
    with pytest.raises(ConfigError, match="min_ratio"):
        DensityKV(min_ratio=1.5)
