"""Skip plans on the decode engine: skipped layers and sublayers are not run, the logits equal the
module path's with the same plan, invariance holds, ``generate`` takes the engine, dynamic plans
(SkipDecode, AdaSkip) follow their per-step decisions, and self-speculation drafts on the engine."""

from __future__ import annotations

import pytest
import torch
from test_engine import (
    TOLERANCE,
    _generate,
    build,
    rows_equal_single_rows,
    run,
    tokens,
    windows_and_threads_equal,
)

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime
from infertrix.skip import (
    AdaSkip,
    ApplySkipPlan,
    AttentionDrop,
    ShortGPT,
    SkipDecode,
    SkippedAttention,
    SkipPlan,
)
from infertrix.speculative import SelfSpeculative, speculative_stats

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
# gemma3's layers 0 and 1 anchor the cache (first sliding, first global): their attention runs
PLANS = {
    "layer": SkipPlan.of(layers=[2]),
    "attention": SkipPlan.of(attention=[2]),
    "mlp": SkipPlan.of(mlp=[1, 3]),
    "mixed": SkipPlan.of(layers=[3], attention=[2], mlp=[1]),
}


def with_plan(arch: str, plan, kind: str = "fp32", engine: bool = True, seed: int = 0):
    model = build(arch, kind, seed=seed, engine=False)
    ix.optimize(model, plan if not isinstance(plan, SkipPlan) else ApplySkipPlan(plan=plan),
                *(["engine"] if engine else []))
    return model


def calib(n=96, seed=3):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(PLANS))
def test_logits_match_module_path_with_the_plan(arch, name):
    model = with_plan(arch, PLANS[name])
    ids = tokens(20, 1)
    cache = EngineCache(model.config)
    got = torch.cat([run(model, ids[:, :12], cache=cache), run(model, ids[:, 12:17], cache=cache),
                     run(model, ids[:, 17:], cache=cache)], 1)
    report = engine_runtime(model).report()
    assert report["engine_forwards"] == 3 and report["module_forwards"] == 0
    assert report["skips"]
    skipped_attention = [e.layer for e in PLANS[name] if e.sublayer != "mlp"]
    for i, layer in enumerate(cache.layers):  # a skipped attention stores nothing, as on the module path
        assert layer.get_seq_length() == (0 if i in skipped_attention else 20)
    want = run(with_plan(arch, PLANS[name], engine=False), ids)
    assert (got - want).abs().max() <= TOLERANCE["fp32"] * want.std(), (got - want).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_window_batch_and_thread_invariance_with_a_plan(arch):
    """With a plan, every position's logits are the same bits in the prompt, in steps, in windows,
    as a row of a padded batch, and at 1 or 2 threads."""
    model = with_plan(arch, PLANS["mixed"], "w4a8")
    windows_and_threads_equal(model, tokens(30, 2), (1, 2, 5))
    rows_equal_single_rows(model, [tokens(n, 10 + i)[0] for i, n in enumerate([9, 4, 13])], tokens(3, 30).expand(3, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_takes_the_engine_and_matches_the_module_path(arch):
    ids = tokens(12, 4)
    for plan in (PLANS["mixed"], "uniform_skip(count=1)"):
        model = with_plan(arch, plan)
        got = _generate(model, ids)
        report = engine_runtime(model).report()
        assert report["model"] == "supported" and report["module_forwards"] == 0
        assert report["engine_forwards"] == got.shape[1] - ids.shape[1]
        assert torch.equal(got, _generate(with_plan(arch, plan, engine=False), ids))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_calibrated_plans_take_the_engine(arch):
    ids = tokens(10, 5)
    for strategy in (ShortGPT(count=1, calibration_ids=calib(), window_tokens=48, progress=False),
                     AttentionDrop(count=1, calibration_ids=calib(), window_tokens=48, progress=False)):
        model = with_plan(arch, strategy)
        got = _generate(model, ids, n=12)
        assert engine_runtime(model).report()["module_forwards"] == 0
        assert torch.equal(got, _generate(with_plan(arch, strategy, engine=False), ids, n=12))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_skipdecode_schedule_runs_on_the_engine(arch):
    """SkipDecode's depth falls with the position: the engine decides per step (and per column of a
    prompt that straddles a threshold) as its ScheduledLayer does."""
    ids = tokens(8, 6)
    sd = SkipDecode(count=2, start_position=4, ramp_tokens=10, protect_last=False)
    model = with_plan(arch, sd)
    got = _generate(model, ids, n=16)
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0 and report["engine_forwards"] == got.shape[1] - ids.shape[1]
    assert torch.equal(got, _generate(with_plan(arch, sd, engine=False), ids, n=16))
    cache = EngineCache(model.config)  # a window straddling a threshold equals 1-token steps
    full = run(model, got, cache=cache)
    stepped = EngineCache(model.config)
    parts = [run(model, got[:, :3], cache=stepped)] + [run(model, got[:, j : j + 1], cache=stepped)
                                                       for j in range(3, got.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_adaskip_measures_the_prompt_on_the_module_path_and_decodes_on_the_engine():
    ids = tokens(16, 7)
    model = with_plan("llama", AdaSkip(fraction=0.3))
    got = _generate(model, ids, n=10)
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 1 and report["engine_forwards"] == 9
    assert any("AdaSkip measures" in k for k in report["fallbacks"])
    assert ix.skip.skip_state(model).controller.plan.entries and report["skips"]
    assert torch.equal(got, _generate(with_plan("llama", AdaSkip(fraction=0.3), engine=False), ids, n=10))


def test_a_module_swapped_outside_skip_plans_takes_the_module_path():
    model = build("llama")
    model.model.layers[2].self_attn = SkippedAttention(2)  # by hand: no plan in the skip state
    _generate(model, tokens(5, 1), n=3)
    report = engine_runtime(model).report()
    assert report["model"].startswith("module path only: layer 2") and report["engine_forwards"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_self_speculative_skip_plan_drafts_on_the_engine(arch):
    ids = torch.cat([tokens(6, 8)] * 2, 1)
    want = _generate(build(arch), ids, n=16)
    model = build(arch, engine=False)
    ix.optimize(model, SelfSpeculative(plan=PLANS["mixed"], adaptive=False, num_tokens=3), "engine")
    got = _generate(model, ids, n=16)
    assert torch.equal(got, want)
    stats = speculative_stats(model).report()
    assert stats["draft path"] == "engine (skipping 1:mlp, 2:attention, 3:layer), on the model's KV cache"
    assert engine_runtime(model).report()["module_forwards"] == 0


def test_self_speculative_on_a_model_with_a_plan_applied():
    """A plan applied for good and a draft plan on top: both run on the engine, lossless against
    plain decoding of the model with its plan."""
    ids = torch.cat([tokens(6, 9)] * 2, 1)
    want = _generate(with_plan("qwen3", SkipPlan.of(mlp=[1])), ids, n=12)
    model = build("qwen3", engine=False)
    ix.optimize(model, ApplySkipPlan(plan=SkipPlan.of(mlp=[1])),
                SelfSpeculative(plan=SkipPlan.of(layers=[2]), adaptive=False), "engine")
    assert torch.equal(_generate(model, ids, n=12), want)
    assert speculative_stats(model).report()["draft path"] == "engine (skipping 2:layer), on the model's KV cache"
    assert engine_runtime(model).report()["module_forwards"] == 0


def test_toggling_a_plan_keeps_the_engine_plan():
    model = build("llama")
    runtime = engine_runtime(model)
    runtime.supported()
    runner = runtime.runner
    with SkipPlan.of(layers=[1], attention=[2]).active(model):
        assert runtime.supported() and runtime.runner is runner
        assert runtime.report()["skips"] == {1: "skipped", 2: "mlp only"}
    assert runtime.supported() and runtime.runner is runner and "skips" not in runtime.report()


def test_a_plan_with_a_kv_policy_says_why_and_growing_storage_runs_on_the_engine():
    ids = tokens(40, 2)
    plan = SkipPlan.of(layers=[2], attention=[1])
    policy = build("llama", engine=False)
    ix.optimize(policy, ApplySkipPlan(plan=plan), "snapkv:0.5", "engine")
    _generate(policy, ids, n=3)
    assert any("skip plan with a KV-cache policy" in k for k in engine_runtime(policy).report()["fallbacks"])
    growing = build("llama", engine=False)
    ix.optimize(growing, ApplySkipPlan(plan=plan), "growing_kv", "engine")
    got = _generate(growing, ids, n=8)
    assert engine_runtime(growing).report()["module_forwards"] == 0
    assert torch.equal(got, _generate(with_plan("llama", plan, engine=False), ids, n=8))
