"""Strategies: what they pick, that they match their paper's criterion, recipes, budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.core.model import decoder_layers
from infertrix.skip import (
    AdaSkip,
    AttentionDrop,
    ScheduledLayer,
    ShortGPT,
    SkipDecode,
    SkippedLayer,
    SkipPlan,
    UniformSkip,
    measure_similarities,
)


def calib(n=96, seed=3):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def tiny10(arch="llama"):
    return make_tiny(arch, num_hidden_layers=10)


def test_uniform_spreads_middle_layers():
    m = tiny10()
    plan = UniformSkip(fraction=0.2).plan(m)
    assert plan.indices("layer") == [3, 7]  # 2 of 10 layers, centred in the halves of layers 1..8
    assert UniformSkip(count=4).plan(m).indices("layer") == [2, 4, 6, 8]
    assert plan.compute_fraction(m) == pytest.approx(0.2)
    (t,) = ix.parse_recipe("uniform_skip:0.3")
    assert isinstance(t, UniformSkip) and t.fraction == 0.3
    with pytest.raises(ConfigError, match="keep_first must be >= 1"):
        UniformSkip(keep_first=0)
    with pytest.raises(ConfigError, match="fraction must be in"):
        UniformSkip(fraction=1.2)


def test_similarities_match_hidden_states():
    """ShortGPT's BI from the hooks equals 1 - cos between consecutive output_hidden_states."""
    m = tiny10()
    ids = calib(64)
    sims = measure_similarities(m, ids, window_tokens=64, progress=False)
    hs = m(ids.unsqueeze(0), output_hidden_states=True).hidden_states
    for i in range(9):  # the last entry of hidden_states is after the final norm
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert sims.layer[i] == pytest.approx(cos, abs=1e-5)
    assert sims.tokens == 64 and all(-1 <= s <= 1 for s in sims.attention + sims.mlp)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_similarity_is_cos_with_residual(arch):
    m = make_tiny(arch)
    ids = calib(32)
    sims = measure_similarities(m, ids, window_tokens=32, progress=False)
    # recompute layer 2's attention criterion by hand: cos(X, X + post(attn(norm(X))))
    captured = {}
    layer = decoder_layers(m)[2]
    h1 = layer.register_forward_pre_hook(lambda mod, a, k: captured.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True)
    h2 = layer.self_attn.register_forward_hook(lambda mod, a, out: captured.__setitem__("attn", out[0]))
    m(ids.unsqueeze(0))
    h1.remove(), h2.remove()
    delta = captured["attn"]
    if arch == "gemma3":
        delta = layer.post_attention_layernorm(delta)
    cos = torch.nn.functional.cosine_similarity(captured["x"], captured["x"] + delta, dim=-1).mean().item()
    assert sims.attention[2] == pytest.approx(cos, abs=1e-5)


def test_shortgpt_picks_lowest_block_influence():
    m = tiny10()
    sg = ShortGPT(fraction=0.3, calibration_ids=calib(), window_tokens=48, progress=False)
    plan = sg.plan(m)
    bi = {i: 1 - s for i, s in enumerate(sg.measure(m).layer)}  # measured once, kept on m
    cands = [i for i in range(1, 9)]
    assert sorted(plan.indices("layer")) == sorted(sorted(cands, key=bi.get)[:3])
    assert all(e.score == pytest.approx(bi[e.layer], abs=1e-6) for e in plan)
    ix.optimize(m, sg)
    assert sum(isinstance(x, SkippedLayer) for x in decoder_layers(m)) == 3
    assert "compute_skipped: 30.0%" in str(ix.describe(m))
    ix.restore(m)
    assert not any(isinstance(x, SkippedLayer) for x in decoder_layers(m))


def test_shortgpt_needs_text_when_no_tokenizer():
    m = tiny10()
    with pytest.raises(ConfigError, match="pass tokenizer=..., calibration_ids=..."):
        ShortGPT(fraction=0.2, progress=False).plan(m)


def test_attention_drop_picks_most_similar_and_refuses_too_much():
    m = tiny10()
    ad = AttentionDrop(count=4, calibration_ids=calib(), window_tokens=48, progress=False)
    plan = ad.plan(m)
    sims = ad.measure(m).attention
    assert sorted(plan.indices("attention")) == sorted(sorted(range(1, 9), key=lambda i: -sims[i])[:4])
    assert plan.indices("layer") == [] and plan.indices("mlp") == []
    # attention is 12288 of 30720 weights per tiny layer: 8 skippable = 32% of compute at most
    with pytest.raises(ConfigError, match=r"only 8 that may be skipped \(at most 32% of its decoder compute\)"):
        AttentionDrop(fraction=0.5, calibration_ids=calib(), progress=False).plan(m)
    with AttentionDrop(count=3, similarities=ad.measure(m)).plan(m).active(m):
        out = m.generate(calib(8).unsqueeze(0), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert sum(layer.is_initialized for layer in out.cache.layers) == 7


def test_skipdecode_schedule_is_monotonic_and_batch_uniform():
    m = tiny10()
    sd = SkipDecode(fraction=0.3, ramp_tokens=12, start_position=4)
    sched = sd.schedule(m)
    assert [layer for layer, _ in sched] == [1, 2, 3]  # lowest layers first, as in the paper
    assert [t for _, t in sched] == [8, 12, 16]
    assert sd.plan(m).indices("layer") == [1, 2, 3]


def test_skipdecode_teacher_forcing_equals_incremental_decoding():
    """The where-based multi-token pass equals token-by-token decoding, and decode steps past a
    layer's threshold do not run that layer."""
    m = tiny10()
    ix.optimize(m, SkipDecode(fraction=0.3, ramp_tokens=9, start_position=3))
    layers = decoder_layers(m)
    assert isinstance(layers[1], ScheduledLayer)
    calls = {i: 0 for i in (1, 2, 3)}
    for i in calls:
        layers[i].layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x = calib(16).unsqueeze(0)
    full_pass = m(x).logits
    out = m(x[:, :2], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    calls.update({1: 0, 2: 0, 3: 0})  # count decode-step calls only (thresholds 6, 9, 12)
    for t in range(2, 16):
        out = m(x[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert torch.allclose(full_pass, inc, atol=1e-5)
    assert calls == {1: 4, 2: 7, 3: 10}  # positions 2..5, 2..8, 2..11
    ix.restore(m)
    assert not any(isinstance(x, ScheduledLayer) for x in decoder_layers(m))
    with pytest.raises(ConfigError, match="order must be one of"):
        SkipDecode(order="random")


def test_skipdecode_same_depth_for_every_row():
    m = tiny10()
    ix.optimize(m, SkipDecode(fraction=0.2, ramp_tokens=4))
    x = calib(12).view(2, 6)
    x[1, :2] = 0
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding: row 1's positions lag row 0's
    out = m.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                     return_dict_in_generate=True)
    lengths = [layer.get_seq_length() for layer in out.cache.layers]
    # layer 1 stops at position 2, layer 2 at 4 (both rows alike): their caches hold the prompt only
    assert lengths[1] == lengths[2] == 6 and lengths[0] == 9


def test_adaskip_measures_prefill_and_skips_while_decoding():
    m = tiny10()
    t = AdaSkip(fraction=0.2)
    ix.optimize(m, t)
    layers = decoder_layers(m)
    calls = {}
    for i, layer in enumerate(layers):
        for name, mod in (("attention", layer.self_attn), ("mlp", layer.mlp)):
            calls[(i, name)] = 0
            mod.register_forward_hook(lambda *a, key=(i, name): calls.__setitem__(key, calls[key] + 1))
    x = calib(10).unsqueeze(0)
    m.generate(x, max_new_tokens=5, do_sample=False)
    plan = ix.skip.skip_state(m).controller.plan
    assert plan is not None and 0 < plan.compute_fraction(m) <= 0.2
    assert {e.sublayer for e in plan} <= {"attention", "mlp"}
    for key, n in calls.items():
        assert n == (1 if key in plan else 5), (key, n)  # prefill runs all, the 4 decode steps skip
    # the chosen sublayers are the most similar ones given the budget
    assert min(e.score for e in plan) >= 0
    # a new prompt is measured afresh, with every sublayer back in place for its prefill
    m.generate(calib(7, seed=9).unsqueeze(0), max_new_tokens=2, do_sample=False)
    assert ix.skip.skip_state(m).controller.prefills == 2
    ix.restore(m)
    assert all(not isinstance(layer.self_attn, torch.nn.Module) or type(layer.self_attn).__name__.endswith("Attention")
               and "Skipped" not in type(layer.self_attn).__name__ for layer in layers)
    assert not m.model._forward_pre_hooks and not m.model._forward_hooks
    with pytest.raises(ConfigError, match="set fraction, not count"):
        AdaSkip(count=2)


def test_strategies_conflict_and_compose_with_other_stages():
    m = tiny10()
    with pytest.raises(ix.ConflictError, match="layer skipping"):
        ix.optimize(m, UniformSkip(0.2), "shortgpt:0.2")


def test_skip_plan_transform_from_file(tmp_path):
    m = tiny10()
    path = SkipPlan.of(layers=[3], mlp=[5]).save(tmp_path / "p.json")
    x = calib(8).unsqueeze(0)
    ref = m(x).logits
    ix.optimize(m, f"skip_plan:{path}")
    assert isinstance(decoder_layers(m)[3], SkippedLayer)
    d = ix.describe(m)
    assert "3:layer, 5:mlp" in str(d)
    ix.restore(m)
    assert torch.equal(m(x).logits, ref)
    with pytest.raises(ConfigError, match="exactly one of"):
        ix.optimize(m, "skip_plan")


@pytest.mark.smollm2
def test_smollm2_strategies(smollm2, tmp_path):
    model, tok = smollm2
    sg = ShortGPT(fraction=0.2, tokenizer=tok, calibration_windows=1, window_tokens=256, progress=False)
    plan = sg.plan(model)
    assert len(plan) == 6 and not {0, 29} & set(plan.indices("layer"))
    assert plan.compute_fraction(model) == pytest.approx(0.2)
    again = SkipPlan.load(plan.save(tmp_path / "sg.json"))
    assert again == plan
    ad = AttentionDrop(fraction=0.1, similarities=sg.measure(model)).plan(model)
    assert len(ad) == 12 and ad.indices("attention") and 0 not in ad.indices("attention")
    x = tok("It is a truth universally acknowledged", return_tensors="pt")
    ix.optimize(model, SkipDecode(fraction=0.2, ramp_tokens=4))
    try:
        out = model.generate(**x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    finally:
        ix.restore(model)
    lengths = [layer.get_seq_length() for layer in out.cache.layers]
    assert lengths[0] == x["input_ids"].shape[1] + 5 and min(lengths) < lengths[0]
