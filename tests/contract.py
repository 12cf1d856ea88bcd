"""The contract every registered transform keeps, as checks a test runs on one transform class.

tests/core/test_contract.py runs them over ``infertrix.available()``; a new method gets them with no
edit here. Configs use small windows (``conftest.small``) so tiny models' short prompts suffice.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers as tf
from conftest import make_tiny, small
from moe.moe_models import make_moe

import infertrix as ix
from infertrix.core import Transform, UnsupportedModelError
from infertrix.core.registry import family_of
from infertrix.skip import SkipPlan

IDS = torch.tensor([[1, 7, 9, 11, 13, 5, 6, 7, 9, 11, 13, 5, 8, 9]])  # ids < 128: any tiny vocabulary


def contract_names() -> list[str]:
    """What the contract test runs over: every registered transform but tests' own (``_`` names)."""
    return sorted(n for n in ix.available() if not n.startswith("_"))


def contract_config(cls: type[Transform]) -> Transform:
    """``cls`` with small windows, and the one object some need (a draft model, a skip plan)."""
    if cls.name == "draft_model":
        return cls(draft=make_tiny("llama", seed=1, vocab_size=259))
    if cls.name == "skip_plan":
        return cls(plan=SkipPlan.of(layers=[1]))
    return small(cls)


def contract_model(cls: type[Transform], folder) -> torch.nn.Module:
    """A tiny model ``cls`` claims: an MoE for the moe family, else a dense Llama saved with a byte
    tokenizer in ``folder`` (transforms that calibrate on text find the tokenizer from the model)."""
    if family_of(cls) == "moe":
        return make_moe("mixtral")
    return tf.AutoModelForCausalLM.from_pretrained(folder).eval()


def check_recipe_round_trip(transform: Transform) -> None:
    """object -> recipe string -> the same object (where every field fits in a recipe: plain values)."""
    plain = (int, float, str, bool, type(None))
    fields = [f for f in dataclasses.fields(transform) if f.init]
    if all(isinstance(getattr(transform, f.name), plain) for f in fields):
        assert ix.parse_recipe(transform.recipe()) == [transform], transform.recipe()
    else:  # a model or a plan is no text: the recipe carries the name, the caller passes the object
        assert transform.recipe().startswith(transform.name)


def check_optimize_describe_restore(transform: Transform, model: torch.nn.Module) -> None:
    """optimize + generate works, describe names it, restore gives the original logits bit for bit
    (or, where it cannot be undone, says so and why)."""
    with torch.no_grad():
        before = model(IDS).logits
    assert ix.optimize(model, transform) is model
    out = model.generate(IDS, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)
    described = ix.describe(model)
    listed = described.to_dict()["transforms"]
    assert [t["name"] for t in listed if not t["by_default"]] == [transform.name]
    assert [t["name"] for t in listed if t["by_default"]] == ([] if transform.name == "engine" else ["engine"])
    assert transform.name in str(described)
    try:
        ix.restore(model, strict=True)
    except RuntimeError as exc:  # irreversible: named with its reason, and it stays applied
        assert transform.name in str(exc)
        report = ix.restore(model)
        assert report.not_restored[transform.name]
        return
    assert not ix.describe(model).to_dict()["transforms"]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def check_unsupported_models(transform: Transform) -> None:
    """Models the transform cannot act on are refused with a typed error naming why, unchanged:
    an MoE transform on a dense model, a cache or decoding transform on a model without generate."""
    cls = type(transform)
    refused = []
    if family_of(cls) == "moe":
        refused.append((make_tiny("llama"), "expert"))
    if cls.stage.acts_through_generate:
        base = tf.LlamaModel(make_tiny("llama").config).eval()  # no language-model head: no generate
        refused.append((base, "generate"))
    for model, why in refused:
        try:
            ix.optimize(model, transform)
        except UnsupportedModelError as exc:
            assert why in str(exc).lower(), exc
        else:
            raise AssertionError(f"{cls.name} accepted a {type(model).__name__}")
        assert not ix.describe(model).to_dict()["transforms"]  # nothing applied


def check_contract(cls: type[Transform], folder) -> None:
    transform = contract_config(cls)
    check_recipe_round_trip(transform)
    check_optimize_describe_restore(transform, contract_model(cls, folder))
    check_unsupported_models(contract_config(cls))
