"""MoE models on the decode engine: the attention half on the engine's ops, the MoE block on the
engine's row-invariant kernels (``engine/moe.py``: ``RowMoE``) or, where it does not know the
block, as the model's module. Logits against the module path, row invariance (windows, batch rows,
threads), offloaded and low-bit experts, the prefetch hooks the engine calls itself, skip plans, KV
policies, speculative decoding, and what still takes the module path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_engine import (
    _windows_equal,
    rows_equal_single_rows,
    run,
    tokens,
    windows_and_threads_equal,
)

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime
from infertrix.engine.moe import sigmoid_rows
from infertrix.kvcache import new_cache
from infertrix.moe import ExpertOffload, offload_runtime
from infertrix.skip import ApplySkipPlan, SkipPlan

sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
from moe_models import make_moe  # noqa: E402

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
# engine vs module path, max |diff| over the logits' std: the float kernels sum in another order
# (the module path's router and experts also round by the rows of each call); w4a8: a flipped
# int8 activation code
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
    assert report["moe_blocks"] == "3 of 3 MoE blocks on the engine's row-invariant kernels"
    _close(got, run(build(arch, kind, engine=False, implementation=implementation), ids), kind)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_dense_and_moe_layers_mixed(arch):
    # mlp_only_layers: layer 1 is a dense MLP (packed), layers 0 and 2 MoE blocks (RowMoE)
    model = build(arch, mlp_only_layers=[1])
    ids = tokens(20, 2)
    got = _windows(model, ids)
    assert [lp.mlp is not None for lp in engine_runtime(model).runner.layers] == [True, False, True]
    assert engine_runtime(model).report()["moe_blocks"] == "2 of 2 MoE blocks on the engine's row-invariant kernels"
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
    assert report["moe_blocks"].startswith("3 of 3")
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


@pytest.mark.parametrize("arch", ARCHS)
def test_kivi_steps_on_moe_models_run_on_the_engine(arch):
    """One-token steps over KIVI codes (codes once 8 tokens are past the residual) run the engine's
    KIVI step on MoE layers too: the module path's logits to float32 rounding, no fallback."""
    kivi = "kivi(group_size=8, residual_length=8)"
    models = [make_moe(arch), make_moe(arch)]
    ix.optimize(models[0], kivi)
    ix.optimize(models[1], kivi, "engine(enabled=false)")
    ids = tokens(30, 6)
    steps = tokens(8, 7)
    caches = [new_cache(m) for m in models]
    for j in range(-1, 8):
        feed = ids if j < 0 else steps[:, j:j + 1]
        got, want = (run(m, feed, cache=c) for m, c in zip(models, caches, strict=True))
        _close(got, want)
    assert caches[0].layers[0].n_quantized > 0
    report = engine_runtime(models[0]).report()
    assert report["engine_forwards"] == 9 and report["module_forwards"] == 0, report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter", ["pld", "lookahead"])  # linear drafts, token trees
def test_drafters_are_token_identical(arch, drafter):
    # the MoE blocks are row-invariant on the engine: a verification window routes as 1-token steps
    ids = torch.cat([tokens(8, 7), tokens(8, 7), tokens(4, 8)], 1)  # a repeat for the lookup to find
    want = _greedy(build(arch), ids, n=16)
    model = build(arch)
    ix.restore(model)
    ix.optimize(model, drafter)
    assert torch.equal(_greedy(model, ids, n=16), want)
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0 and report["moe_blocks"].startswith("3 of 3")


def _offloaded(arch: str, bits: int | None):
    model = make_moe(arch, implementation="eager")
    ix.optimize(model, ExpertOffload(experts_per_layer=3, expert_bits=bits, prefetch=False))
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["fp32", "w4a8", "offload", "offload-int4"])
def test_window_and_thread_invariance(arch, kind):
    """An MoE model's logits are the same bits in the prompt, in 1-token steps, in windows of
    2..7 tokens and at 1 or 2 threads: the router, the experts (in memory, offloaded float or
    int4) and Qwen2-MoE's shared expert run on row-invariant kernels."""
    model = _offloaded(arch, 4 if kind == "offload-int4" else None) if kind.startswith("offload") else build(arch, kind)
    windows_and_threads_equal(model, tokens(24, 2), (1, 2, 3, 5, 7))
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0 and report["moe_blocks"].startswith("3 of 3 MoE blocks"), report


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_rows_equal_single_rows(arch):
    model = build(arch)
    rows_equal_single_rows(model, [tokens(n, 30 + i)[0] for i, n in enumerate([9, 4, 13])], tokens(6, 40).view(3, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_float_experts_are_the_in_memory_bits(arch):
    # offloading is lossless on the engine: the offloaded float experts run the same kernels
    ids = tokens(16, 11)
    want = run(build(arch), ids, cache=EngineCache(make_moe(arch).config))
    model = _offloaded(arch, None)
    got = run(model, ids, cache=EngineCache(model.config))
    assert torch.equal(got, want)
    assert engine_runtime(model).report()["moe_blocks"].startswith("3 of 3")
    # expert by expert, on more rows than one kernel call takes (32): the same bits as in memory
    from infertrix.moe.experts import float_expert_rows

    experts = model.model.layers[0].mlp.experts
    original = make_moe(arch).model.layers[0].mlp.experts
    x = torch.randn(45, original.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(1))
    for e in (0, 5):
        assert torch.equal(experts.expert_rows(e, x), float_expert_rows(x, original.gate_up_proj[e].detach(),
                                                                         original.down_proj[e].detach()))


def test_more_experts_per_token_and_long_calls_stay_invariant():
    # top-4 routing (the sums of four experts' outputs) and calls of 40 rows (two kernel chunks per expert)
    model = build("qwen2_moe", num_experts_per_tok=4)
    ids = tokens(40, 13)
    full = run(model, ids, cache=EngineCache(model.config))
    for width in (1, 3):
        _windows_equal(model, ids, full, first=34, width=width)
    assert engine_runtime(model).report()["moe_blocks"].startswith("3 of 3")
    _close(full, run(build("qwen2_moe", engine=False, num_experts_per_tok=4), ids))


def test_a_block_that_disagrees_with_the_engine_runs_as_the_module(monkeypatch):
    from infertrix.engine.moe import RowMoE

    route = RowMoE.route
    monkeypatch.setattr(RowMoE, "route", lambda self, logits: (lambda w, e: (w * 1.0001, e))(*route(self, logits)))
    model = build("mixtral")
    run(model, tokens(6, 14), cache=EngineCache(model.config))
    assert engine_runtime(model).report()["moe_blocks"].startswith(
        "0 of 3 MoE blocks on the engine's row-invariant kernels; 3 run as the model's modules "
        "(3: its router's top-k weights differ from the engine's routing)")


def test_the_probe_runs_the_block_in_eval_mode():
    # a training-mode Mixtral jitters its router input with the global generator: the probe must not
    model = make_moe("mixtral", router_jitter_noise=0.5)
    ix.optimize(model)
    model.train()
    state = torch.random.get_rng_state()
    ix.describe(model)  # builds the engine's plan
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules())
    model.eval()
    run(model, tokens(6, 15), cache=EngineCache(model.config))
    assert engine_runtime(model).report()["moe_blocks"].startswith("3 of 3")


def test_an_unknown_block_runs_as_the_module_and_says_why():
    model = make_moe("mixtral")
    for layer in model.model.layers[:2]:
        layer.mlp.experts.act_fn = torch.nn.GELU()  # an activation the row-invariant block does not run
    ids = tokens(12, 12)
    want = run(model, ids)
    ix.optimize(model)
    got = run(model, ids, cache=EngineCache(model.config))
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0
    assert report["moe_blocks"].startswith("1 of 3 MoE blocks on the engine's row-invariant kernels; 2 run as "
                                           "the model's modules (2: its experts' activation is GELU"), report
    _close(got, want)


def test_sigmoid_rows_is_the_same_bits_whatever_the_shape():
    x = torch.randn(4099, generator=torch.Generator().manual_seed(3)) * 4
    full = sigmoid_rows(x)
    assert torch.allclose(full, torch.sigmoid(x), rtol=0, atol=1e-6)
    for n in (1, 5, 63, 64, 65, 40000):
        y = torch.randn(n, 1, generator=torch.Generator().manual_seed(n)) * 4
        whole = sigmoid_rows(y)
        assert whole.shape == y.shape
        for i in {0, n // 2, n - 1}:
            assert torch.equal(whole[i], sigmoid_rows(y[i:i + 1])[0]), (n, i)
    assert torch.equal(torch.stack([sigmoid_rows(x[i:i + 1])[0] for i in range(0, 4099, 7)]), full[::7])
