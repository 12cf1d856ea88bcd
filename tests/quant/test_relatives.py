"""The relatives on the same machinery: W4A16, W8A8 (SmoothQuant), SqueezeLLM dense-and-sparse."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch import nn

import infertrix as ix
from infertrix.quant import W4A8, W4A16, W8A8, W4A8Linear, W4A16Linear, W8A8Linear, load_quantized
from infertrix.quant.int4 import quantize_int4
from infertrix.quant.w4a8_linear import split_outliers
from infertrix.quant.w4a16 import layer_group_size


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def calib(n=4, t=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


def test_w4a16_linear_matches_dequantized():
    lin = nn.Linear(576, 64)
    w = quantize_int4(lin.weight, 64, False, two_level=False)
    mod = W4A16Linear.from_int4(w, lin.bias, torch.float32)
    x = torch.randn(3, 576)
    y = mod(x)
    assert y.dtype == torch.float32
    # computed in bfloat16 (torch's fast path): bfloat16-level agreement with the float product
    ref = nn.functional.linear(x, w.dequantize(), lin.bias)
    assert (y - ref).norm() / ref.norm() < 1e-2


def test_w4a16_group_per_layer():
    assert layer_group_size(576, 128) == 64
    assert layer_group_size(1536, 128) == 128
    assert layer_group_size(576, -1) == 64
    with pytest.raises(ix.ConfigError, match="multiple of 32"):
        layer_group_size(100, 32)


@pytest.mark.parametrize("gptq", [False, True])
def test_w4a16_transform(tmp_path, gptq):
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (2, 10))
    ref = logits(model, ids)
    kw = dict(gptq=True, calibration_ids=calib(), progress=False) if gptq else {}
    ix.optimize(model, W4A16(group_size=32, **kw))
    assert isinstance(model.model.layers[0].mlp.down_proj, W4A16Linear)
    out = logits(model, ids)
    assert (out - ref).norm() / ref.norm() < 0.4
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), ids), out)
    ix.restore(model)
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_w8a8_transform(tmp_path, alpha):
    model = make_tiny("qwen2")
    ids = torch.randint(3, 128, (2, 10))
    ref = logits(model, ids)
    ix.optimize(model, W8A8(smooth_alpha=alpha, calibration_ids=calib(), progress=False))
    assert isinstance(model.model.layers[1].self_attn.q_proj, W8A8Linear)
    out = logits(model, ids)
    assert (out - ref).norm() / ref.norm() < 0.05  # int8 is close to float
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), ids), out)
    ix.restore(model)
    assert torch.equal(logits(model, ids), ref)


def test_w8a8_rows_independent():
    """Per-token activation scales: a row's output never depends on the other rows (checked on the
    quantized layers themselves; the model's float layers, e.g. torch's GEMM, need not be)."""
    model = make_tiny("llama")
    ix.optimize(model, W8A8(smooth_alpha=None))
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert layers
    for lin in layers:
        x = torch.randn(3, 7, lin.in_features) * torch.tensor([1.0, 50.0, 0.01])[:, None, None]
        full = lin(x)
        for i in range(3):
            assert torch.equal(lin(x[i : i + 1])[0], full[i])
            assert torch.equal(lin(x[i, 2:3])[0], full[i, 2])


def test_two_weight_quantizers_conflict():
    model = make_tiny("llama")
    with pytest.raises(ix.ConflictError):
        ix.optimize(model, W4A8(), W8A8(smooth_alpha=None))


def test_split_outliers():
    w = torch.randn(40, 50)
    w[3, 7] = 100.0
    dense, (rows, cols, vals) = split_outliers(w, 0.01)
    assert rows.numel() == 20 and dense[3, 7] == 0
    assert torch.equal(dense.index_put((rows, cols), vals, accumulate=True), w)


def test_dense_and_sparse_reduces_error_with_outliers(tmp_path):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight.normal_(generator=g)
        mask = torch.rand(lin.weight.shape, generator=g) < 0.003
        lin.weight[mask] *= 30  # a few large weights stretch their groups' ranges
    model_err = {}
    for frac in (0.0, 0.005):
        t = W4A8(group_size=64, outlier_fraction=frac)
        mod = t.quantize_linear(lin, lin.weight.detach().float(), None)
        model_err[frac] = (mod.dequantize() - lin.weight).norm().item()
        x = torch.randn(5, 256, generator=g)
        exact = nn.functional.linear(x, mod.dequantize())
        assert (mod(x) - exact).norm() / exact.norm() < 0.02  # only int8 activation rounding differs
    assert model_err[0.005] < 0.5 * model_err[0.0], model_err
    # and it saves / loads as plain buffers
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32, outlier_fraction=0.005))
    assert model.model.layers[0].mlp.up_proj.outlier_values is not None
    ids = torch.randint(3, 128, (1, 6))
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, W4A8Linear)
    assert torch.equal(logits(loaded, ids), out)
