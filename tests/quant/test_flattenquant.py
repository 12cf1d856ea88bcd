"""FlattenQuant: per-tensor static int8 activations after flattening the large input channels."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core.recipe import parse_recipe
from infertrix.quant import W8A8, FlattenLinear, FlattenQuant, load_quantized
from infertrix.quant.flattenquant import flatten_plan


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def calib(n=4, t=32):
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.randint(3, 128, (1, t), generator=g) for _ in range(n)])


def test_flatten_plan_keeps_the_budget():
    a = torch.ones(100)
    a[3], a[50] = 40.0, 10.0
    t, copies = flatten_plan(a, budget=0.1, max_copies=64)
    assert int((copies - 1).sum()) <= 10 and copies[3] == torch.ceil(40 / torch.tensor(t))
    assert copies.min() == 1 and (a / copies <= t * (1 + 1e-9)).all()
    t0, c0 = flatten_plan(a, budget=0.0, max_copies=64)
    assert t0 == pytest.approx(40.0) and int(c0.sum()) == 100  # no budget: the tensor's max, no copies
    _, capped = flatten_plan(a, budget=1.0, max_copies=4)
    assert capped.max() == 4


def test_linear_flattens_and_beats_plain_per_tensor():
    """A layer whose input has one huge channel: flattened per-tensor int8 is far closer to the float
    product than per-tensor int8 without flattening (budget 0)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(50, 64, generator=g)
    x[:, 5] *= 60
    absmax = x.abs().amax(0)
    ref = x @ w.t()
    errs = []
    for budget in (0.0, 0.25):
        t, copies = flatten_plan(absmax, budget, 64)
        mod = FlattenLinear.from_float(w, None, torch.float32, t, copies)
        assert mod.qweight.shape == (32, 64) and mod.extra_channels == int((copies - 1).sum())
        flat = torch.nonzero(copies > 1).flatten()
        assert mod.flat.shape == (1 + flat.numel(), 3) and torch.equal(mod.flat[1:, 0].long(), flat)
        q = FlattenLinear.from_float(w, None, torch.float32, t, torch.ones_like(copies)).qweight
        assert torch.equal(mod.qweight[:, : flat.numel()], q[:, flat])  # the flattened channels' columns first
        errs.append(((mod(x) - ref).norm() / ref.norm()).item())
    assert errs[1] < errs[0] / 3 and errs[1] < 0.02


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transform_round_trip(tmp_path, arch):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (2, 10))
    ref = logits(model, ids)
    ix.optimize(model, FlattenQuant(calibration_ids=calib(), progress=False))
    assert isinstance(model.model.layers[1].mlp.down_proj, FlattenLinear)
    out = logits(model, ids)
    assert (out - ref).norm() / ref.norm() < 0.1
    assert "w8a8_flat_linear" in ix.describe(model).transforms[0]["report"]["kernel"]
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), ids), out)
    ix.restore(model)
    assert torch.equal(logits(model, ids), ref)


def test_rows_independent_and_close_to_per_token():
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (3, 12))
    ref = logits(model, ids)
    per_token = ix.optimize(make_tiny("llama"), W8A8(calibration_ids=calib(), progress=False))
    ix.optimize(model, FlattenQuant(calibration_ids=calib(), progress=False))
    out = logits(model, ids)
    for i in range(3):
        assert torch.equal(logits(model, ids[i : i + 1])[0], out[i])
    err = (out - ref).norm() / ref.norm()
    assert err < 3 * (logits(per_token, ids) - ref).norm() / ref.norm() + 0.01


def test_recipe_and_refusals():
    (t,) = parse_recipe("flattenquant:0.05")
    assert isinstance(t, FlattenQuant) and t.flatten_budget == 0.05
    with pytest.raises(ix.ConfigError, match="flatten_budget"):
        FlattenQuant(flatten_budget=2.0)
    with pytest.raises(ix.ConfigError, match="max_copies"):
        FlattenQuant(max_copies=0)


def test_checkpoint_layout_checks():
    """Checkpoints of the earlier layouts (appended columns; tiled correction columns) are refused
    with the fix named; a table that does not match its step and copies is refused at load."""
    for legacy in ({"extra_channels": 3}, {"flat_channels": 1}):
        with pytest.raises(ix.ConfigError, match="quantize the float model again"):
            FlattenLinear.from_spec({"type": "w8a8_flat", "in_features": 8, "out_features": 4, "bias": False,
                                     "dtype": "float32", **legacy})
    w = torch.randn(4, 8)
    copies = torch.ones(8, dtype=torch.long)
    copies[[2, 5]] = torch.tensor([3, 2])
    mod = FlattenLinear.from_float(w, None, torch.float32, 1.0, copies)
    mod.check_loaded("m")
    loaded = FlattenLinear.from_spec(mod.spec())
    loaded.load_state_dict(mod.state_dict())
    loaded.check_loaded("m")
    for row, col, change, match in ((1, 2, 2.0, "multipliers"), (0, 1, 2.0, "multipliers"), (2, 1, 2.0, "multipliers"),
                                    (1, 1, 0.0, "extra copies"), (2, 0, 0.5, "channels")):
        saved = mod.flat.clone()
        mod.flat[row, col] *= change
        with pytest.raises(ix.ConfigError, match=match):
            mod.check_loaded("m")
        mod.flat.copy_(saved)
    with pytest.raises(ix.ConfigError, match="max_copies"):
        FlattenQuant(max_copies=129)
    FlattenQuant(max_copies=128)


def test_projections_of_one_input_fuse_bit_for_bit():
    """q/k/v-style modules with one calibration fuse into one call equal to their outputs side by
    side (any output counts); a different flattening or step does not fuse."""
    g = torch.Generator().manual_seed(3)
    copies = torch.ones(40, dtype=torch.long)
    copies[[3, 17, 30]] = torch.tensor([2, 5, 3])
    mods = [FlattenLinear.from_float(torch.randn(n, 40, generator=g), torch.randn(n, generator=g), torch.float32,
                                     2.0, copies) for n in (48, 16, 32)]
    x = torch.randn(7, 40, generator=g) * 2
    refs = [m(x) for m in mods]
    fused = FlattenLinear.fuse(mods)
    assert fused is not None and torch.equal(fused(x), torch.cat(refs, -1))
    assert all(torch.equal(m(x), r) for m, r in zip(mods, refs, strict=True))
    ptr = fused.qweight.untyped_storage().data_ptr()  # the originals view the fused weight: not stored twice
    assert all(m.qweight.untyped_storage().data_ptr() == ptr for m in mods)
    other = copies.clone()
    other[5] = 2
    w, b = torch.randn(16, 40, generator=g), torch.randn(16, generator=g)
    assert FlattenLinear.fuse([mods[0], FlattenLinear.from_float(w, b, torch.float32, 2.0, other)]) is None
    assert FlattenLinear.fuse([FlattenLinear.from_float(w, b, torch.float32, 2.5, copies), mods[1]]) is None  # step
    assert FlattenLinear.fuse([FlattenLinear.from_float(w[:12], b[:12], torch.float32, 2.0, copies), mods[1]]) is not None
    assert FlattenLinear.fuse([FlattenLinear.from_float(w, b, torch.float32, 2.0, copies), mods[1]]) is not None
