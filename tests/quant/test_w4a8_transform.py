"""W4A8 transform and W4A8Linear on tiny random models of every architecture we claim."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, make_tiny
from torch import nn

import infertrix as ix
from infertrix.linear.swap import select_linears
from infertrix.quant import W4A8, W4A8Linear, quantize_int4
from infertrix.quant.int4 import group_index


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_error_is_bounded(group_size, symmetric):
    w = torch.randn(48, 200)
    qw = quantize_int4(w, group_size, symmetric)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    deq = qw.dequantize()
    gidx = group_index(200, group_size)
    step = qw.scale[:, None] * qw.group_scale[:, gidx].float()
    # round to nearest inside the covered range: at most half a step (plus float slack)
    assert torch.all((deq - w).abs() <= step * 0.5 + 1e-6)


def test_w4a8_linear_matches_dequantized_float():
    lin = nn.Linear(576, 100, bias=True)
    q = W4A8Linear.from_linear(lin, group_size=128)
    x = torch.randn(3, 7, 576)
    y = q(x)
    ref = nn.functional.linear(x, q.dequantize(), lin.bias)
    assert y.shape == (3, 7, 100)
    assert (y - ref).norm() / ref.norm() < 0.02  # only int8 activation rounding differs
    assert (y - lin(x)).norm() / lin(x).norm() < 0.15  # int4 weights


@pytest.mark.parametrize("arch", ARCHS)
def test_w4a8_on_every_architecture(arch):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (2, 12))
    ref = logits(model, ids)
    # the layers alone, unrotated, so they can be compared with their dequantized weights below
    ix.optimize(model, W4A8(group_size=32, rotate=False, quantize_lm_head=False))
    n_lin = sum(isinstance(m, W4A8Linear) for m in model.modules())
    assert n_lin == 4 * 7  # q k v o gate up down in each of 4 layers
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.4  # int4 weights on random tiny weights
    # against the same model with the dequantized weights in float: only int8 activations differ
    fake = make_tiny(arch)
    for name, mod in model.named_modules():
        if isinstance(mod, W4A8Linear):
            fake.get_submodule(name).weight.data.copy_(mod.dequantize())
    assert (out - logits(fake, ids)).norm() / ref.norm() < 0.05
    rep = ix.describe(model).transforms[0]["report"]
    assert rep["layers"] == 28 and rep["bytes_after"] < rep["bytes_before"] / 4
    assert rep["kernel"].startswith("w4a8_linear: ")
    ix.restore(model)
    assert not any(isinstance(m, W4A8Linear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


def test_batch_independence_end_to_end():
    # lm_head quantized too: a float lm_head runs torch's GEMM, whose rounding depends on the number
    # of rows on some CPUs (seen on an AMD EPYC); every other layer is per row already
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32, quantize_lm_head=True))
    ids = torch.randint(3, 128, (4, 10))
    full = logits(model, ids)
    for i in range(4):
        assert torch.equal(logits(model, ids[i : i + 1])[0], full[i])


def test_filter_fn_and_lm_head_tied():
    model = make_tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    ix.optimize(model, W4A8(group_size=32, quantize_lm_head=True, rotate=False,  # rotation changes the embedding
                            filter_fn=lambda m, n: "mlp" in n or n == "lm_head"))
    assert isinstance(model.lm_head, W4A8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, W4A8Linear)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    # the tied embedding keeps its float weight and still works
    assert torch.equal(model.model.embed_tokens.weight, emb)
    ids = torch.randint(3, 128, (1, 8))
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    ix.restore(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_generate_and_recipe():
    model = make_tiny("qwen2")
    ix.optimize(model, "w4a8:64(symmetric=true)")
    t = ix.describe(model).transforms[0]
    assert t["params"]["group_size"] == 64 and t["params"]["symmetric"] is True
    ids = torch.randint(3, 128, (2, 6))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape == (2, 12)


def test_torch_compile():
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32))
    ids = torch.randint(3, 128, (1, 9))
    ref = logits(model, ids)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        out = compiled(input_ids=ids).logits
    assert torch.equal(out, ref)


def test_bfloat16_model():
    model = make_tiny("llama").to(torch.bfloat16)
    ix.optimize(model, W4A8(group_size=32))
    out = logits(model, torch.randint(3, 128, (1, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_clear_errors():
    with pytest.raises(ix.ConfigError, match="multiple of 8"):
        W4A8(group_size=12)
    with pytest.raises(ix.ConfigError, match="smooth_alpha"):
        W4A8(smooth_alpha=1.5)
    model = make_tiny("llama")
    with pytest.raises(ix.UnsupportedModelError, match="filter_fn"):
        ix.optimize(model, W4A8(filter_fn=lambda m, n: False))
    model = make_tiny("llama").to(torch.float64)
    with pytest.raises(ix.UnsupportedModelError, match="float32, bfloat16 or float16"):
        ix.optimize(model, W4A8())
    assert not any(isinstance(m, W4A8Linear) for m in model.modules())


def test_select_linears_default_excludes_head():
    model = make_tiny("mistral")
    names = select_linears(model, None, False)
    assert "lm_head" not in names and len(names) == 28
    assert "lm_head" in select_linears(model, None, True)


@pytest.mark.smollm2
def test_smollm2_pipeline_and_tied_head(smollm2):
    from transformers import pipeline

    model, tok = smollm2
    emb = model.model.embed_tokens.weight
    ix.optimize(model, W4A8(group_size=128, quantize_lm_head=True))
    try:
        assert isinstance(model.lm_head, W4A8Linear) and model.model.embed_tokens.weight is emb
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        text = pipe("The capital of France is", max_new_tokens=5, do_sample=False)[0]["generated_text"]
        assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
        rep = ix.describe(model).transforms[0]["report"]
        assert rep["layers"] == 30 * 7 + 1 and "quantized" in rep["lm_head"]
    finally:
        ix.restore(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_keep_original_false_frees_float_layers():
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32, keep_original=False))
    t = ix.describe(model).transforms[0]
    assert not t["reversible"] and t["report"]["layers"] == 28 + 1  # lm_head quantized by default
    with pytest.warns(UserWarning, match="keep_original=False"):
        rep = ix.restore(model)
    assert not rep.complete
    assert isinstance(model.model.layers[0].self_attn.q_proj, W4A8Linear)
