"""Transforms are pure configuration: one transform object applied to two models gives each model its
own results, kept in that model's one run-time record (core/state.py), never on the transform."""

from __future__ import annotations

import dataclasses

import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core.state import copy_without_state, state
from infertrix.skip import AdaSkip, ShortGPT
from infertrix.speculative import QuantizedSelf, SelfSpeculative


def calib(n=96, seed=3):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def only_fields(t) -> bool:
    """Nothing but the dataclass fields on the transform: no run-time result was stored on it."""
    return set(vars(t)) == {f.name for f in dataclasses.fields(t)}


def test_one_shortgpt_object_calibrates_each_model():
    a, b = make_tiny("llama", num_hidden_layers=10), make_tiny("llama", seed=5, num_hidden_layers=10)
    t = ShortGPT(fraction=0.3, calibration_ids=calib(), window_tokens=48, progress=False)
    plan_a, plan_b = t.plan(a), t.plan(b)
    assert plan_a != plan_b  # b was measured, not given a's calibration
    assert plan_b == ShortGPT(fraction=0.3, calibration_ids=t.calibration_ids, window_tokens=48, progress=False).plan(b)
    assert t.similarities is None and only_fields(t)
    ix.optimize(a, t)
    ix.optimize(b, t)
    text_a, text_b = str(ix.describe(a)), str(ix.describe(b))
    for plan, text in ((plan_a, text_a), (plan_b, text_b)):
        assert "skipped: " + ", ".join(f"{e.layer}:{e.sublayer}" for e in plan) in text
    ix.restore(a)
    assert "_infertrix" not in a.__dict__ and state(b).applied  # b keeps its own
    ix.restore(b)


def test_one_adaskip_object_controls_each_model_apart():
    a, b = make_tiny("llama"), make_tiny("llama", seed=5)
    t = AdaSkip(fraction=0.2)
    ix.optimize(a, t)
    ix.optimize(b, t)
    a.generate(calib(10).unsqueeze(0), max_new_tokens=3, do_sample=False)
    assert ix.skip.skip_state(a).controller.prefills == 1 and ix.skip.skip_state(b).controller.prefills == 0
    assert only_fields(t)
    ix.restore(a)
    ix.restore(b)


def test_one_quantized_self_object_drafts_each_model_with_its_own_copy():
    a, b = make_tiny("llama"), make_tiny("llama", seed=5)
    t = QuantizedSelf(weight_bits=8, adaptive=False)
    ix.optimize(a, t)
    ix.optimize(b, t)
    da, db = t.draft_for(a), t.draft_for(b)
    assert da is not db
    assert da.model.embed_tokens.weight is a.model.embed_tokens.weight
    assert db.model.embed_tokens.weight is b.model.embed_tokens.weight
    ids = calib(12).unsqueeze(0)
    a.generate(ids, do_sample=False, max_new_tokens=6)
    assert ix.speculative.speculative_stats(a).total.calls == 1
    assert ix.speculative.speculative_stats(b).total.calls == 0
    for m in (a, b):
        report = ix.describe(m).transforms[0]["report"]
        assert report["draft_bytes"] > 0 and report["all calls"]["calls"] == (1 if m is a else 0)
    assert only_fields(t)
    ix.restore(a)
    assert state(a) is None and t.draft_for(b) is db  # b's draft stays while b carries the transform
    ix.restore(b)


def test_one_self_speculative_object_searches_each_model_apart():
    a, b = make_tiny("llama"), make_tiny("llama", seed=5)
    t = SelfSpeculative(plan=[ix.skip.SkipPlan.of(layers=[1]), ix.skip.SkipPlan.of(mlp=[2])], search_steps=2, adaptive=False)
    ix.optimize(a, t)
    ix.optimize(b, t)
    a.generate(calib(12).unsqueeze(0), do_sample=False, max_new_tokens=12)
    assert sum(t.plan_search(a).seconds) > 0 and sum(t.plan_search(b).seconds) == 0
    assert only_fields(t)
    ix.restore(a)
    ix.restore(b)


def test_a_copy_carries_no_record():
    m = make_tiny("llama")
    ix.optimize(m, "uniform_skip:0.2", "pld")
    twin = copy_without_state(m)
    assert "_infertrix" not in twin.__dict__ and "generate" not in twin.__dict__
    assert ix.describe(twin).transforms == [] and len(ix.describe(m).transforms) == 3  # and the engine
    ix.restore(m)
