"""MoE models on the decode engine: the attention half on the engine's ops, the MoE block as the
model's module (``engine/moe.py``). Logits against the module path, offloaded and low-bit experts,
the prefetch hooks the engine calls itself, skip plans, KV policies, speculative decoding, and
what still takes the module path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_engine import run, tokens

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime
from infertrix.moe import ExpertOffload, offload_runtime
from infertrix.skip import ApplySkipPlan, SkipPlan

sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
from moe_models import make_moe  # noqa: E402

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
# engine vs module path, max |diff| over the logits' std: the float kernels sum in another order,
# and the MoE block's router and float experts round by the rows of each call (window of 12/5/3
# rows on the engine, 20 on the module path); w4a8: a flipped int8 activation code
TOLERANCE = {"fp32": 1e-4, "w4a8": 1e-2}


def build(arch: str, kind: str = "fp32", engine: bool = True, implementation: str | None = None, **overrides):
    model = make_moe(arch, implementation=implementation, **overrides)
    ix.optimize(model, *(["w4a8"] if kind == "w4a8" else []), "engine" if engine else "engine(enabled=false)")
    return model


def _windows(model, ids):
    cache = EngineCache(model.config)
    return torch.cat([run(model, ids[:, :12], cache=cache), run(model, ids[:, 12:17], cache=cache),
                      run(model, ids[:, 17:], cache=cache)], 1)


def _close(got, want, kind="fp32"):
    assert (got - want).abs().max() <= TOLERANCE[kind] * want.std(), (got - want).abs().max()


def _greedy(model, ids, n=12, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kind", ["fp32", "w4a8"])
def test_logits_match_module_path(arch, implementation, kind):
    model = build(arch, kind, implementation=implementation)
    ids = tokens(20, 1)
    got = _windows(model, ids)
    report = engine_runtime(model).report()
    assert report["model"] == "supported" and report["engine_forwards"] == 3 and report["module_forwards"] == 0
    assert report["moe_blocks"].startswith("3 MoE blocks run as the model's modules")
    _close(got, run(build(arch, kind, engine=False, implementation=implementation), ids), kind)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_dense_and_moe_layers_mixed(arch):
    # mlp_only_layers: layer 1 is a dense MLP (packed), layers 0 and 2 MoE blocks (modules)
    model = build(arch, mlp_only_layers=[1])
    ids = tokens(20, 2)
    got = _windows(model, ids)
    assert [lp.mlp is not None for lp in engine_runtime(model).runner.layers] == [True, False, True]
    _close(got, run(build(arch, engine=False, mlp_only_layers=[1]), ids))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_sliding_window_shorter_than_the_windows(arch):
    # Mixtral's window comes from its config, Qwen2-MoE's per layer type (use_sliding_window)
    extra = dict(sliding_window=6) if arch == "mixtral" else dict(sliding_window=6, use_sliding_window=True,
                                                                  max_window_layers=1)
    model = build(arch, **extra)
    ids = tokens(20, 9)
    got = _windows(model, ids)
    assert any(lp.ints[5] == 6 for lp in engine_runtime(model).runner.layers)
    _close(got, run(build(arch, engine=False, **extra), ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_takes_the_engine_and_matches_module_greedy(arch):
    ids = tokens(9, 3)
    model = build(arch)
    out = _greedy(model, ids)
    report = engine_runtime(model).report()
    assert report["engine_forwards"] == 12 and report["module_forwards"] == 0
    assert torch.equal(out, _greedy(build(arch, engine=False), ids))


def _count_engine_hooks(model) -> list[int]:
    """Wrap every hook the engine calls itself (moe.known_hooks) with a counter; returns the counts."""
    from infertrix.engine.moe import ENGINE_CALLS, known_hooks

    calls = []
    for mod in model.modules():
        for hooks in (mod._forward_hooks, mod._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if known_hooks(fn):
                    i = len(calls)
                    calls.append(0)

                    def counted(*args, fn=fn, i=i):
                        calls[i] += 1
                        return fn(*args)

                    setattr(counted, ENGINE_CALLS, True)
                    hooks[key] = counted
    return calls


@pytest.mark.parametrize("bits", [None, 4])
def test_offloaded_experts_and_their_prefetch_hooks_on_the_engine(bits):
    ids = tokens(9, 4)

    def offloaded(plan=None, **kw):
        model = make_moe("mixtral", implementation="eager")
        ix.optimize(model, ExpertOffload(experts_per_layer=2, expert_bits=bits, **kw),
                    *([ApplySkipPlan(plan=plan)] if plan is not None else []))
        return model

    plain = offloaded(prefetch=False)
    want = _greedy(plain, ids)
    for signal, plan in [("layer_output", None), ("attention", None),  # hooks on the layers' output / norms' input
                         ("layer_output", SkipPlan.of(mlp=[0])), ("attention", SkipPlan.of(mlp=[0]))]:
        model = offloaded(plan, prefetch=True, prefetch_signal=signal)
        calls = _count_engine_hooks(model)
        out = _greedy(model, ids)
        report = engine_runtime(model).report()
        assert report["engine_forwards"] == 12 and report["module_forwards"] == 0
        rt = offload_runtime(model)
        rt.prefetcher.stop()
        assert rt.cache.stats().prefetched > 0  # the next layers' experts were prefetched
        if plan is None:
            assert torch.equal(out, want)  # prefetch is lossless on the engine too
        # the engine called each hook as often as the module path does (a skipped MoE block included:
        # there the layer still runs around a pass-through)
        module = offloaded(plan, prefetch=True, prefetch_signal=signal)
        ix.optimize(module, "engine(enabled=false)")
        module_calls = _count_engine_hooks(module)
        _greedy(module, ids)
        assert calls == module_calls and min(calls) >= 12, (calls, module_calls)
    # the same experts on the module path: the same tokens (tiny model: no near tie flips)
    ix.optimize(plain, "engine(enabled=false)")
    assert torch.equal(_greedy(plain, ids), want)


def test_skip_plans_run_the_moe_block_or_the_attention_alone():
    plan = ApplySkipPlan(plan=SkipPlan.of(attention=[1], mlp=[2]))
    ids = tokens(20, 5)

    def with_plan(engine):
        model = make_moe("qwen3_moe")
        ix.optimize(model, plan, "engine" if engine else "engine(enabled=false)")
        return model

    model = with_plan(True)
    got = _windows(model, ids)
    report = engine_runtime(model).report()
    assert report["engine_forwards"] == 3 and report["skips"] == {1: "mlp only", 2: "attention only"}
    _close(got, run(with_plan(False), ids))


def test_kv_policies_and_kivi():
    ids = tokens(40, 6)
    model = build("mixtral")
    ix.restore(model)
    ix.optimize(model, "snapkv:0.5")  # a policy that scores by attention: the engine observes the MoE layers too
    out = _greedy(model, ids, n=6)
    report = engine_runtime(model).report()
    assert report["engine_forwards"] > 0, report
    ix.restore(model)
    ix.optimize(model, "snapkv:0.5", "engine(enabled=false)")
    assert torch.equal(out, _greedy(model, ids, n=6))
    ix.restore(model)
    ix.optimize(model, "kivi(group_size=8, residual_length=8)")  # codes once 8 tokens are past the residual
    _greedy(model, ids, n=4)
    fallbacks = engine_runtime(model).report()["fallbacks"]
    assert any("KIVI codes on an MoE model" in k for k in fallbacks), fallbacks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter", ["pld", "lookahead"])  # linear drafts, token trees
def test_drafters_are_token_identical(arch, drafter):
    # on these tiny models; the MoE router rounds by the rows of a window, so a near tie could flip
    ids = torch.cat([tokens(8, 7), tokens(8, 7), tokens(4, 8)], 1)  # a repeat for the lookup to find
    want = _greedy(build(arch), ids, n=16)
    model = build(arch)
    ix.restore(model)
    ix.optimize(model, drafter)
    assert torch.equal(_greedy(model, ids, n=16), want)
    assert engine_runtime(model).report()["module_forwards"] == 0
