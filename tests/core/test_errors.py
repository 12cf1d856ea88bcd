"""Errors at optimize time: non-models, unknown names and fields, bad values, models a transform
cannot act on; each names the fix and leaves the model as it was."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from conftest import make_tiny

import infertrix as ix
from infertrix.core import ConfigError, InfertrixError, Stage, Transform, UnsupportedModelError
from infertrix.linear import Skinny
from infertrix.skip import SkipPlan
from infertrix.speculative import DraftModel, PromptLookup


@ix.register_transform("_test_labelled")
@dataclass
class Labelled(Transform):
    stage = Stage.LAYERS
    primary = "label"
    label: str = "a"
    count: int | None = None


@pytest.mark.parametrize("verb", [ix.optimize, ix.describe, ix.restore])
@pytest.mark.parametrize("not_a_model", ["str", 42, PromptLookup()])
def test_non_models_are_refused_with_what_is_expected(verb, not_a_model):
    with pytest.raises(TypeError, match=r"takes a PyTorch model \(a torch.nn.Module"):
        verb(not_a_model) if verb is not ix.optimize else verb(not_a_model, "pld")


def test_arguments_swapped_says_the_model_comes_first():
    with pytest.raises(TypeError, match="the model comes first"):
        ix.optimize("pld", make_tiny("llama"))


@pytest.mark.parametrize(
    "recipe, suggestion",
    [("snapk", "snapkv"), ("streaming", "streamingllm"), ("assist", "assisted"), ("pdl", "pld")],
)
def test_unknown_recipe_suggests_the_closest_names_and_aliases(recipe, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown transform '{recipe}' \(did you mean [^)]*'{suggestion}'"):
        ix.parse_recipe(recipe)


def test_unknown_recipe_without_a_close_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        ix.parse_recipe("zzzzzz")
    assert "did you mean" not in str(info.value) and "snapkv" in str(info.value)
    assert "_test_" not in str(info.value)  # test-only registrations stay out of the list


def test_unknown_field_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"has no field 'num_token' \(did you mean 'num_tokens'\?\)"):
        ix.parse_recipe("pld(num_token=3)")


@pytest.mark.parametrize(
    "recipe, msg",
    [
        ("snapkv:abc", r"SnapKV.compression takes a number, got 'abc'"),
        ("pld:abc", r"PromptLookup.num_tokens takes an integer, got 'abc'"),
        ("pld:2.5", r"PromptLookup.num_tokens takes an integer, got 2.5"),
        ("pld(adaptive=3)", r"PromptLookup.adaptive takes true or false, got 3"),
        ("w4a8(group_size=abc)", r"W4A8.group_size takes an integer, got 'abc'"),
        ("uniform:abc", r"UniformSkip.fraction takes a number, got 'abc'"),
        ("_test_labelled(count=x)", r"Labelled.count takes an integer or None, got 'x'"),
    ],
)
def test_bad_values_name_the_field_and_what_it_takes(recipe, msg):
    with pytest.raises(ConfigError, match=msg):
        ix.parse_recipe(recipe)


def test_direct_construction_checks_plain_field_types_too():
    with pytest.raises(ConfigError, match="PromptLookup.num_tokens takes an integer, got '4'"):
        PromptLookup(num_tokens="4")
    assert PromptLookup(num_tokens=4).num_tokens == 4


def test_a_string_field_keeps_text_that_looks_like_a_number():
    (t,) = ix.parse_recipe("_test_labelled:007(count=3)")
    assert t.label == "007" and t.count == 3
    (t,) = ix.parse_recipe("_test_labelled(count=none)")
    assert t.count is None


TINY_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                 max_position_embeddings=128)


def _non_causal(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama_base":  # a decoder without its language-model head: no generate()
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        return tf.LlamaModel(cfg).eval()
    cls = {"bert": tf.BertModel, "bert_mlm": tf.BertForMaskedLM}[kind]
    return cls(tf.BertConfig(**TINY_BERT)).eval()


def _default_config(name: str) -> Transform:
    cls = ix.available()[name]
    if name == "draft_model":
        return cls(draft=make_tiny("llama"))
    if name == "skip_plan":
        return cls(plan=SkipPlan.of(layers=[1]))
    return cls()


@pytest.mark.parametrize("kind", ["bert", "bert_mlm", "llama_base"])
@pytest.mark.parametrize("name", sorted(n for n in ix.available() if not n.startswith("_")))
def test_every_transform_refuses_a_non_causal_lm_clearly_or_works(kind, name):
    model = _non_causal(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ix.optimize(model, _default_config(name))
    except InfertrixError as exc:  # refused: a clear, typed error, and nothing changed
        msg = str(exc)
        if kind.startswith("bert"):
            assert "decoder" in msg, msg  # the real reason: it is not a decoder-only LM
        if ix.available()[name].stage.acts_through_generate:
            assert "generate" in msg and "AutoModelForCausalLM" in msg, msg
        assert "float32" not in msg, msg
        assert "_infertrix" not in model.__dict__ and "generate" not in model.__dict__
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    else:  # works: the model still runs, and restore() leaves it as it was
        with torch.no_grad():
            model(torch.tensor([[1, 5, 7, 9]]))
        ix.restore(model)


def test_draft_model_refuses_a_draft_that_cannot_generate():
    model = make_tiny("llama")
    with pytest.raises(UnsupportedModelError, match="DraftModel's draft works through model.generate.*BertModel"):
        ix.optimize(model, DraftModel(draft=_non_causal("bert")))
    assert "generate" not in model.__dict__


def test_skinny_names_the_real_reason():
    with pytest.raises(UnsupportedModelError, match="skinny_linear: cannot find the decoder layers of BertModel"):
        ix.optimize(_non_causal("bert"), Skinny())
    with pytest.raises(UnsupportedModelError, match="float32 weights only.*bfloat16; load the model in float32"):
        ix.optimize(make_tiny("llama").to(torch.bfloat16), Skinny())
    quantized = ix.optimize(make_tiny("llama"), "w4a16(quantize_lm_head=true)")
    with pytest.raises(UnsupportedModelError, match="skinny_linear: no nn.Linear layers"):
        ix.optimize(quantized, Skinny())
