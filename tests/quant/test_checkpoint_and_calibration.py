"""Save/load round trips and calibration (GPTQ, SmoothQuant smoothing) of quantized models."""

from __future__ import annotations

import pytest
import torch
from conftest import FloatCopy, make_tiny

import infertrix as ix
from infertrix.quant import W4A8, W4A8Linear, load_quantized
from infertrix.quant.gptq import gptq_int4
from infertrix.quant.int4 import quantize_int4


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def calib(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    model = make_tiny("llama", tie_word_embeddings=tied)
    ix.optimize(model, W4A8(group_size=32, quantize_lm_head=True))
    ids = torch.randint(3, 128, (2, 9))
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, W4A8Linear)
    assert torch.equal(logits(loaded, ids), ref)
    assert ix.describe(loaded).transforms[0]["name"] == "w4a8"
    if tied:  # the embedding came back in float, untouched by the quantized head
        assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_save_load_symmetric_qwen2_with_bias(tmp_path):
    model = make_tiny("qwen2")
    ix.optimize(model, W4A8(group_size=-1, symmetric=True))
    ids = torch.randint(3, 128, (1, 7))
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path), ids), ref)


def test_load_rejects_float_checkpoint(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ix.ConfigError, match="not an infertrix-quantized checkpoint"):
        load_quantized(tmp_path)


def test_gptq_reduces_output_error_of_one_layer():
    g = torch.Generator().manual_seed(0)
    k, n = 128, 64
    # correlated inputs with outlier channels: where GPTQ's error feedback pays
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3 + torch.eye(k))
    x[:, :4] *= 8
    w = torch.randn(n, k, generator=g)
    h = (x.t() @ x).double()
    for sym in (False, True):
        rtn = quantize_int4(w, 32, sym).dequantize()
        err_rtn = (x @ (rtn - w).t()).norm()
        err_clip = (x @ (quantize_int4(w, 32, sym, mse_clip=True).dequantize() - w).t()).norm()
        assert err_clip < err_rtn
        for kw in ({}, {"act_order": True}, {"mse_clip": True}, {"two_level": False}):
            gq = gptq_int4(w, h, 32, sym, **kw)
            assert int(gq.q.max()) <= 15
            err_gptq = (x @ (gq.dequantize() - w).t()).norm()
            assert err_gptq < 0.8 * err_rtn, (sym, kw, err_gptq, err_rtn)


def test_calibration_improves_over_rtn_on_tiny_model():
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (4, 32))
    ref = logits(model, ids)
    errs = {}
    for name, t in {
        "rtn": W4A8(group_size=32),
        "gptq": W4A8(group_size=32, gptq=True, calibration_ids=calib(8), progress=False),
        "gptq_act_order": W4A8(group_size=32, gptq=True, act_order=True, mse_clip=True, calibration_ids=calib(8),
                               progress=False),
    }.items():
        ix.optimize(model, t)
        errs[name] = ((logits(model, ids) - ref).norm() / ref.norm()).item()
        ix.restore(model)
        assert torch.equal(logits(model, ids), ref)
    assert errs["gptq"] < errs["rtn"] and errs["gptq_act_order"] < errs["rtn"], errs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_smoothing_is_folded_and_undone(arch):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (2, 16))
    ref = logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    t = W4A8(group_size=32, smooth_alpha=0.5, gptq=True, calibration_ids=calib(4), progress=False,
             quantize_lm_head=False)  # the layers' error only (a random tiny head quantizes badly)
    ix.optimize(model, t)
    rep = ix.describe(model).transforms[0]["report"]
    assert "smooth(alpha=0.5" in rep["calibration"]
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    out = logits(model, ids)
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.3
    ix.restore(model)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    assert torch.equal(logits(model, ids), ref)


def test_smoothing_alone_preserves_the_float_function():
    # smoothing is exact in float: with a no-op quantizer the model's outputs are unchanged
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (2, 16))
    ref = logits(model, ids)
    ix.optimize(model, FloatCopy(smooth_alpha=0.8, calibration_ids=calib(2), progress=False))
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_missing_tokenizer_is_a_clear_error():
    model = make_tiny("llama")
    with pytest.raises(ix.ConfigError, match="tokenizer"):
        ix.optimize(model, W4A8(gptq=True, progress=False))


@pytest.mark.smollm2
def test_gptq_beats_rtn_on_smollm2(smollm2):
    model, tok = smollm2
    text = open(__import__("infertrix").__path__[0] + "/data/prideprejudice.txt").read()[:6000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :384]

    def nll():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    base = nll()
    losses = {}
    for name, t in {
        "rtn": W4A8(group_size=64),
        "gptq": W4A8(group_size=64, gptq=True, tokenizer=tok, calibration_windows=4, window_tokens=256, progress=False),
    }.items():
        ix.optimize(model, t)
        losses[name] = nll()
        ix.restore(model)
    assert abs(nll() - base) < 1e-6
    assert losses["gptq"] < losses["rtn"], (base, losses)
