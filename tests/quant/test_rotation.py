"""Residual-stream rotation before quantization (QuaRot / SpinQuant R1): exact in float, undone
exactly, saved and loaded, and it pays where the residual stream has an outlier channel."""

from __future__ import annotations

import pytest
import torch
from conftest import FloatCopy, make_tiny

import infertrix as ix
from infertrix.quant import W4A8, W8A8, load_quantized
from infertrix.quant.rotation import random_orthogonal


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_norms(model, seed=0):
    """Tiny models start with all-ones norms; make them non-trivial so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(24, seed=3)
    torch.testing.assert_close(q @ q.t(), torch.eye(24, dtype=torch.float64))
    assert torch.equal(q, random_orthogonal(24, seed=3)) and not torch.equal(q, random_orthogonal(24, seed=4))


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("qwen2", False)])
def test_rotation_preserves_the_float_function_and_restores(arch, tied):
    model = random_norms(make_tiny(arch, tie_word_embeddings=tied))
    ids = torch.randint(3, 128, (2, 11))
    ref = logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ix.optimize(model, FloatCopy(rotate=True, quantize_lm_head=True))
    emb = model.get_input_embeddings().weight
    assert not torch.equal(emb, before["model.embed_tokens.weight"])  # really rotated
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))  # norm folded
    assert model.lm_head.weight is not emb and not model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    ix.restore(model)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(logits(model, ids), ref)


def test_rotation_helps_int8_activations_with_an_outlier_channel():
    def outlier_model():
        model = make_tiny("llama", tie_word_embeddings=False)
        with torch.no_grad():  # one residual channel 100x larger: what per-token int8 handles worst
            model.model.embed_tokens.weight[:, 7] *= 100
        return model

    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(outlier_model(), ids)
    errs = {}
    for rotate in (False, True):
        model = outlier_model()
        ix.optimize(model, W8A8(smooth_alpha=None, rotate=rotate))  # int8 weights: activations dominate
        errs[rotate] = ((logits(model, ids) - ref).norm() / ref.norm()).item()
    assert errs[True] < 0.75 * errs[False], errs


def test_rotated_model_saves_and_loads(tmp_path):
    model = random_norms(make_tiny("llama", tie_word_embeddings=True))
    ix.optimize(model, W4A8(group_size=32, rotate=True))  # lm_head stays float, untied
    ids = torch.randint(3, 128, (2, 9))
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path)
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(logits(loaded, ids), ref)
    assert "+rotated" in ix.describe(model).transforms[0]["report"]["calibration"]


def test_rotation_refuses_gemma_norms():
    model = make_tiny("gemma3")
    with pytest.raises(ix.UnsupportedModelError, match="rotate=True"):
        ix.optimize(model, W4A8(rotate=True))


def test_failed_apply_leaves_the_model_unrotated():
    model = random_norms(make_tiny("llama", tie_word_embeddings=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ix.ConfigError, match="tokenizer"):  # fails after rotating, while calibrating
        ix.optimize(model, W4A8(rotate=True, gptq=True, progress=False))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
