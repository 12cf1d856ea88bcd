"""One contract over the registry: every registered transform round-trips through its recipe, runs
under optimize + generate, shows in describe, restores to bit-identical logits (or says why not) and
refuses models it does not support. The parameters are ``infertrix.available()``: a new method is
tested by adding it, with no edit here (tests/kvcache/test_new_method.py shows it)."""

from __future__ import annotations

import pytest
from contract import check_contract, contract_names

import infertrix as ix


@pytest.mark.parametrize("name", contract_names())
def test_every_registered_transform_keeps_the_contract(name, tiny_lm_folder):
    check_contract(ix.available()[name], tiny_lm_folder)
