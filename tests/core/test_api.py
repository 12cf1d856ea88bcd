"""optimize / describe / restore, stage order, conflicts, recipes, generate hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import (
    Applied,
    ConfigError,
    ConflictError,
    Stage,
    Transform,
    UnsupportedModelError,
)
from infertrix.core.generation import add_generate_hook
from infertrix.core.registry import _REGISTRY

ORDER: list[str] = []


# Test-only transforms that really change the model, so undo can be checked.
@ix.register_transform("_test_scale_lm_head")
@dataclass
class ScaleHead(Transform):
    stage = Stage.WEIGHTS
    primary = "factor"
    factor: float = 2.0

    def validate(self):
        if self.factor <= 0:
            raise ConfigError(f"factor must be > 0, got {self.factor}")

    def apply(self, model):
        ORDER.append(self.name)
        old = model.lm_head.weight.detach().clone()
        model.lm_head.weight = torch.nn.Parameter(old * self.factor)

        def undo():
            model.lm_head.weight = torch.nn.Parameter(old)

        return Applied(self, undo=undo, report=lambda: {"factor_applied": self.factor})


@ix.register_transform("_test_cache_a")
@dataclass
class CacheA(Transform):
    stage = Stage.CACHE
    conflict_group = "kv cache policy"

    def apply(self, model):
        ORDER.append(self.name)
        remove = add_generate_hook(model, self._hook, order=int(self.stage))
        return Applied(self, undo=remove)

    @staticmethod
    def _hook(model, args, kwargs):
        kwargs.setdefault("max_new_tokens", 3)  # visible effect: generate defaults to 3 tokens
        return args, kwargs


@ix.register_transform("_test_cache_b")
@dataclass
class CacheB(Transform):
    stage = Stage.CACHE
    conflict_group = "kv cache policy"

    def apply(self, model):
        return Applied(self)


@ix.register_transform("_test_irreversible")
@dataclass
class Irreversible(Transform):
    stage = Stage.LAYERS

    def apply(self, model):
        ORDER.append(self.name)
        return Applied(self, irreversible_reason="test: weights were overwritten")


@ix.register_transform("_test_llama_only")
@dataclass
class LlamaOnly(Transform):
    stage = Stage.LAYERS

    def check_model(self, model):
        from infertrix.core.model import require_model_type

        require_model_type(model, ("llama",), "LlamaOnly")

    def apply(self, model):
        return Applied(self, undo=lambda: None)


@ix.register_transform("_test_fails")
@dataclass
class Fails(Transform):
    stage = Stage.DECODING

    def apply(self, model):
        raise RuntimeError("boom")


def test_optimize_returns_model_and_applies_in_stage_order():
    ORDER.clear()
    m = make_tiny("llama")
    out = ix.optimize(m, CacheA(), Irreversible(), ScaleHead(3.0))
    assert out is m
    assert ORDER == ["_test_scale_lm_head", "_test_irreversible", "_test_cache_a"]


def test_restore_undoes_exactly_and_reports_irreversible():
    m = make_tiny("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ix.optimize(m, ScaleHead(2.0), Irreversible())
    assert not torch.equal(m.lm_head.weight, before["lm_head.weight"])
    with pytest.warns(UserWarning, match="cannot be undone.*test: weights were overwritten"):
        rep = ix.restore(m)
    # the engine, on by default, is the newest record and goes first
    assert rep.restored == ["engine", "_test_scale_lm_head"] and "_test_irreversible" in rep.not_restored
    assert not rep.complete
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="cannot fully restore"):
        ix.restore(m, strict=True)


def test_full_restore_clears_state():
    m = make_tiny("qwen2")
    ix.optimize(m, ScaleHead(2.0), CacheA())
    assert "generate" in m.__dict__
    rep = ix.restore(m)
    assert rep.complete and rep.restored == ["engine", "_test_cache_a", "_test_scale_lm_head"]
    assert "generate" not in m.__dict__ and "_infertrix" not in m.__dict__
    assert ix.describe(m).transforms == []


def test_conflicting_transforms_rejected_before_any_change():
    ORDER.clear()
    m = make_tiny("llama")
    w = m.lm_head.weight.clone()
    with pytest.raises(ConflictError, match="CacheB and CacheA both set the model's kv cache policy"):
        ix.optimize(m, ScaleHead(2.0), CacheA(), CacheB())
    assert ORDER == [] and torch.equal(m.lm_head.weight, w)
    ix.optimize(m, CacheA())
    with pytest.raises(ConflictError):
        ix.optimize(m, "_test_cache_b")


def test_stage_order_across_calls():
    m = make_tiny("llama")
    ix.optimize(m, CacheA())
    with pytest.raises(ConflictError, match="must be applied before"):
        ix.optimize(m, ScaleHead(2.0))


def test_unsupported_architecture_error():
    m = make_tiny("qwen2")
    with pytest.raises(UnsupportedModelError, match="does not support model_type 'qwen2'; supported: llama"):
        ix.optimize(m, LlamaOnly())
    ix.optimize(make_tiny("llama"), LlamaOnly())


def test_failure_midway_rolls_back():
    m = make_tiny("llama")
    w = m.lm_head.weight.clone()
    with pytest.raises(RuntimeError, match="boom"):
        ix.optimize(m, ScaleHead(2.0), Fails())
    assert torch.equal(m.lm_head.weight, w)
    assert ix.describe(m).transforms == []


def test_describe_reports_params_and_live_figures():
    m = make_tiny("mistral")
    ix.optimize(m, "_test_scale_lm_head:4")
    d = ix.describe(m)
    assert d.model_type == "mistral"
    entry, engine = d.transforms
    assert engine["name"] == "engine" and engine["by_default"] and not entry["by_default"]
    assert entry["name"] == "_test_scale_lm_head" and entry["stage"] == "weights"
    assert entry["params"] == {"factor": 4} and entry["report"] == {"factor_applied": 4}
    assert d.bytes_before == d.bytes_now > 0
    text = str(d)
    assert "_test_scale_lm_head(factor=4)" in text and "factor_applied: 4" in text


def test_generate_hook_changes_generate_on_this_instance_only():
    a, b = make_tiny("llama"), make_tiny("llama")
    ix.optimize(a, CacheA())
    ids = torch.tensor([[1, 5, 9]])
    out_a = a.generate(ids, do_sample=False)  # hook supplies max_new_tokens=3
    assert out_a.shape[1] == 6
    assert "generate" not in b.__dict__
    assert b.generate(ids, do_sample=False, max_new_tokens=5).shape[1] == 8


def test_validation_error_names_fix():
    with pytest.raises(ConfigError, match="factor must be > 0"):
        ScaleHead(-1)


def test_recipe_parsing_round_trip():
    ts = ix.parse_recipe("_test_scale_lm_head:1.5, _test_cache_a")
    assert [type(t) for t in ts] == [ScaleHead, CacheA] and ts[0].factor == 1.5
    ts = ix.parse_recipe("_test_scale_lm_head(factor=3)")
    assert ts[0].factor == 3
    assert ix.parse_recipe("baseline") == [] and ix.parse_recipe("") == []
    again = ix.parse_recipe(ts[0].recipe())
    assert dataclasses.asdict(again[0]) == dataclasses.asdict(ts[0])


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("nosuch", "unknown transform 'nosuch'"),
        ("_test_cache_a:3", "takes no ':value'"),
        ("_test_scale_lm_head(nope=1)", "has no field 'nope'"),
        ("_test_scale_lm_head(factor=1", "unbalanced"),
        ("_test_scale_lm_head(3)", "must be key=value"),
        ("_test_scale_lm_head:-2", "factor must be > 0"),
    ],
)
def test_recipe_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ix.parse_recipe(bad)


def test_registry_rejects_name_clash():
    with pytest.raises(ValueError, match="already taken"):

        @ix.register_transform("_test_cache_a")
        @dataclass
        class Other(Transform):
            stage = Stage.CACHE

    assert _REGISTRY["_test_cache_a"] is CacheA


def test_optimize_rejects_non_transform():
    with pytest.raises(TypeError, match="Transform objects or recipe strings"):
        ix.optimize(make_tiny("llama"), 42)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_every_claimed_architecture_optimizes_generates_and_restores(arch):
    m = make_tiny(arch)
    ids = torch.tensor([[1, 7, 9, 11, 13]])
    with torch.no_grad():
        before = m(ids).logits
    ix.optimize(m, ScaleHead(2.0), CacheA())
    assert m.generate(ids, do_sample=False).shape[1] == ids.shape[1] + 3
    assert ix.describe(m).model_type == m.config.model_type
    assert ix.restore(m).complete
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)


def test_decoder_layers_and_model_type_helpers():
    from infertrix.core.model import decoder_layers, model_type, tensor_bytes

    m = make_tiny("gemma3")
    assert len(decoder_layers(m)) == 4 and model_type(m) == "gemma3_text"
    # tied embeddings are counted once
    assert tensor_bytes(m) == sum(p.numel() * 4 for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())
    with pytest.raises(UnsupportedModelError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
