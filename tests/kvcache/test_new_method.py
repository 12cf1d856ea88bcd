"""A new score-only KV method is one small file: defined here as a throwaway, it shows up in the
registry, ``infertrix list``, the test lists, the contract test and the kvcache benchmark, and runs
through optimize + generate, with no other edit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from benchmarks.kvcache import cells
from conftest import kv_policies, make_tiny
from contract import check_contract, contract_names

import infertrix as ix
from infertrix import cli
from infertrix.core import registry


@pytest.fixture
def key_peak(monkeypatch):
    """Register the throwaway method in a copy of the registry, dropped after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    # -- the whole method: a config and one score (what a new file in kvcache/ would hold) --
    @ix.register_transform("key_peak")
    @dataclass
    class KeyPeak(ix.kvcache.KVPolicy):
        """KeyPeak: keep the keys with the largest entry. A throwaway method for the registry's tests."""

        use_when = "never: a test's throwaway method"

        def score(self, ctx: ix.kvcache.ScoreContext) -> torch.Tensor:
            return ctx.keys.float().abs().amax(dim=-1)

    return KeyPeak


def test_a_new_method_appears_everywhere_with_no_other_edit(key_peak, capsys, tiny_lm_folder):
    assert ix.available()["key_peak"] is key_peak
    assert ix.available("kvcache")["key_peak"] is key_peak
    assert cli.main(["list"]) == 0
    assert "  key_peak" in capsys.readouterr().out
    assert any(type(p) is key_peak for p in kv_policies(compression=0.5))  # the policy tests' list
    assert "key_peak" in contract_names()
    assert [c[1] for c in cells([0.5], None)].count("KeyPeak") == 1  # the kvcache benchmark's cells
    check_contract(key_peak, tiny_lm_folder)


def test_the_new_method_evicts_through_generate(key_peak):
    model = make_tiny("llama")
    ix.optimize(model, "key_peak:0.5")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 42)
    stored = out.past_key_values.stored_lengths()
    assert max(stored) < 40  # half the prompt evicted in every full-attention layer
