"""SkipPlan: exact semantics, calls really skipped, KV memory, restore, save/load, validation."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny

from infertrix.core import ConfigError
from infertrix.core.model import decoder_layers
from infertrix.skip import (
    SkipEntry,
    SkippedLayer,
    SkipPlan,
    anchor_layers,
    rollback_cache,
    skipping,
)


def ids(batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def some_plan(arch: str) -> SkipPlan:
    # gemma3's tiny model has layers (sliding, full, sliding, full): layers 0 and 1 are anchors
    if arch == "gemma3":
        return SkipPlan.of(layers=[2], attention=[3], mlp=[1])
    return SkipPlan.of(layers=[2], attention=[1, 3], mlp=[3])


def kv_bytes(cache) -> int:
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "is_initialized", False)
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_plan_is_bit_identical(arch):
    m = make_tiny(arch)
    x = ids()
    ref = m(x).logits
    ref_gen = m.generate(x, max_new_tokens=6, do_sample=False)
    before = list(decoder_layers(m))
    with SkipPlan().active(m) as h:
        assert h.swaps == []
        assert list(decoder_layers(m)) == before
        assert torch.equal(m(x).logits, ref)
        assert torch.equal(m.generate(x, max_new_tokens=6, do_sample=False), ref_gen)


@pytest.mark.parametrize("arch", ARCHS)
def test_skipping_equals_zeroing_the_output_projections(arch):
    """Skipping a sublayer is exactly the residual stream without its update."""
    m, ref_model = make_tiny(arch), make_tiny(arch)
    plan = some_plan(arch)
    layers = decoder_layers(ref_model)
    with torch.no_grad():
        for e in plan:
            if e.sublayer in ("layer", "attention"):
                layers[e.layer].self_attn.o_proj.weight.zero_()
            if e.sublayer in ("layer", "mlp"):
                layers[e.layer].mlp.down_proj.weight.zero_()
    x = ids()
    with plan.active(m):
        out = m(x).logits
    assert torch.equal(out, ref_model(x).logits)
    assert not torch.equal(out, m(x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_skipped_sublayers_are_not_run(arch):
    m = make_tiny(arch)
    plan = some_plan(arch)
    calls: dict[tuple[int, str], int] = {}
    for i, layer in enumerate(decoder_layers(m)):
        for name, mod in (("layer", layer), ("attention", layer.self_attn), ("mlp", layer.mlp)):
            calls[(i, name)] = 0
            mod.register_forward_hook(lambda *a, key=(i, name): calls.__setitem__(key, calls[key] + 1))
    with plan.active(m):
        m.generate(ids(), max_new_tokens=4, do_sample=False)
    for (i, name), n in calls.items():
        skipped = (i, name) in plan or (i, "layer") in plan
        assert (n == 0) == skipped, (i, name, n)
        if not skipped:
            assert n == 4  # prefill + 3 decode steps


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_brings_back_the_same_modules(arch):
    m = make_tiny(arch)
    layers = decoder_layers(m)
    objs = [(layer, layer.self_attn, layer.mlp) for layer in layers]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = ids()
    ref = m(x).logits
    handle = some_plan(arch).apply(m)
    assert any(isinstance(layer, SkippedLayer) for layer in layers)
    assert len(m.state_dict()) < len(state)  # skipped weights are out of the model while applied
    handle.undo()
    handle.undo()  # idempotent
    assert [(layer, layer.self_attn, layer.mlp) for layer in layers] == objs
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items()) and m.state_dict().keys() == state.keys()
    assert torch.equal(m(x).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dropped_attention_stores_no_kv(arch):
    m = make_tiny(arch, num_hidden_layers=6, layer_types=None) if arch == "llama" else make_tiny(arch, num_hidden_layers=6)
    x = ids(length=6)
    full = m.generate(x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True).cache
    plan = SkipPlan.of(attention=[2, 4], layers=[5]) if arch == "llama" else SkipPlan.of(attention=[3, 5])
    with plan.active(m):
        part = m.generate(x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True).cache
    for i, layer in enumerate(part.layers):
        assert layer.is_initialized == (not plan.skips_attention(i)), i
    # every layer of these tiny models stores the same number of bytes (no sliding window crops at 8 tokens)
    assert kv_bytes(part) == kv_bytes(full) * (6 - 3 + (arch == "gemma3")) // 6


def test_toggle_per_forward_shares_the_cache():
    """Self-speculation pattern: draft steps with the plan, verify without it, one cache."""
    m = make_tiny("llama")
    plan = SkipPlan.of(layers=[2], attention=[1])
    x = ids(batch=1, length=8)
    out = m(x, use_cache=True)
    cache = out.cache
    tok = out.logits[:, -1:].argmax(-1)
    with plan.active(m):
        draft = m(tok, cache=cache, use_cache=True)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths == [9, 8, 8, 9]  # skipped layers' entries untouched
    rollback_cache(cache, 8)
    assert [layer.get_seq_length() for layer in cache.layers] == [8] * 4
    full_step = m(tok, cache=cache, use_cache=True).logits
    assert torch.allclose(full_step, m(torch.cat([x, tok], 1)).logits[:, -1:], atol=1e-5)
    assert not torch.allclose(draft.logits, full_step)
    with skipping(m, None):
        pass
    assert not any(isinstance(layer, SkippedLayer) for layer in decoder_layers(m))


def test_nested_plans_undo_in_order():
    m = make_tiny("llama")
    layers = decoder_layers(m)
    originals = list(layers)
    attn2 = layers[2].self_attn
    with SkipPlan.of(attention=[2]).active(m):
        with SkipPlan.of(layers=[2, 3]).active(m):
            assert isinstance(layers[2], SkippedLayer) and isinstance(layers[3], SkippedLayer)
        assert layers[2] is originals[2] and layers[2].self_attn is not attn2
    assert list(layers) == originals and layers[2].self_attn is attn2


def test_save_load_and_print(tmp_path):
    plan = SkipPlan([SkipEntry(5, "mlp", 0.98), SkipEntry(3, "layer", 0.01), SkipEntry(4, "attention", 0.97)],
                    method="test", num_layers=8, meta={"fraction": 0.2})
    path = plan.save(tmp_path / "plan.json")
    again = SkipPlan.load(path)
    assert again == plan and [e.key for e in again] == [(3, "layer"), (4, "attention"), (5, "mlp")]
    assert again.entries[1].score == 0.97
    text = str(plan)
    assert "SkipPlan[test]: 3 skipped of 8 layers" in text and "layer   4 attention  score=0.9700" in text
    assert "4:attention" in repr(plan)
    with pytest.raises(ConfigError, match="not a skip plan"):
        SkipPlan.from_json('{"entries": []}')


def test_union_and_compute_fraction():
    m = make_tiny("llama")  # attention 64*64*2 + 64*32*2 = 12288, mlp 3*64*96 = 18432
    a = SkipPlan.of(attention=[1, 2])
    b = SkipPlan.of(layers=[2], mlp=[3])
    u = a | b
    assert [e.key for e in u] == [(1, "attention"), (2, "layer"), (3, "mlp")]
    assert u.compute_fraction(m) == pytest.approx((12288 + 30720 + 18432) / (4 * 30720))


@pytest.mark.parametrize(
    "make, arch, msg",
    [
        (lambda: SkipPlan.of(layers=[7]), "llama", r"skips layers \[7\] but this llama model has 4 decoder layers \(0..3\)"),
        (lambda: SkipPlan.of(attention=[0]), "llama", r"attention of layer\(s\) \[0\].*skip their MLP only"),
        (lambda: SkipPlan.of(layers=[1]), "gemma3", r"attention of layer\(s\) \[1\].*layers \[0, 1\]"),
        (lambda: SkipPlan.of(layers=[1], num_layers=30), "llama", "made for a model with 30 layers"),
    ],
)
def test_validation_errors(make, arch, msg):
    m = make_tiny(arch)
    with pytest.raises(ConfigError, match=msg):
        make().apply(m)
    assert not any(isinstance(layer, SkippedLayer) for layer in decoder_layers(m))


def test_plan_construction_errors():
    with pytest.raises(ConfigError, match="sublayer must be one of"):
        SkipEntry(1, "ffn")
    with pytest.raises(ConfigError, match="twice"):
        SkipPlan.of(layers=[1, 1])
    with pytest.raises(ConfigError, match="whole and also its attention"):
        SkipPlan.of(layers=[1], attention=[1])
    with pytest.raises(ConfigError, match="non-negative int"):
        SkipEntry(-1)


def test_mlp_of_layer_zero_may_be_skipped_and_anchors():
    m = make_tiny("llama")
    with SkipPlan.of(mlp=[0]).active(m):
        m.generate(ids(), max_new_tokens=2, do_sample=False)
    assert anchor_layers(m) == {0}
    assert anchor_layers(make_tiny("gemma3")) == {0, 1}


@pytest.mark.smollm2
def test_smollm2_plan(smollm2):
    model, tok = smollm2
    assert len(decoder_layers(model)) == 30
    x = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    ref = model(x).logits
    with SkipPlan.of(layers=[12, 14], attention=range(16, 24)).active(model):
        out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert not out.cache.layers[12].is_initialized
    assert torch.equal(model(x).logits, ref)
    with pytest.raises(ConfigError, match=r"skips layers \[30\].*30 decoder layers \(0..29\)"):
        SkipPlan.of(layers=[30]).apply(model)
