"""The engine's greedy head: in a greedy generate with no logits processor the LM head returns each
row's argmax (fused into the W4A8 kernel), with tokens identical to computing the logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers import LogitsProcessorList, MinLengthLogitsProcessor

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime, linears

# recipe and the head's kind (w4a16 keeps a float32 head); vocab 1001 is not a multiple of the
# W4A8 kernel's 64-channel chunk nor of its 16-channel panel
HEADS = {"fp32": [], "w8a8": ["w8a8(smooth_alpha=none,quantize_lm_head=true)"], "w4a8": ["w4a8"],
         "w4a16": ["w4a16"]}
HEAD_KIND = {"fp32": "fp32", "w8a8": "w8a8", "w4a8": "w4a8", "w4a16": "fp32"}


def build(kind: str, greedy_head: bool = True, vocab: int = 1001):
    model = make_tiny("llama", 0, vocab_size=vocab, tie_word_embeddings=False)
    ix.optimize(model, *HEADS[kind], f"engine(greedy_head={str(greedy_head).lower()})")
    return model


def prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1001, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    return ids * mask, mask


def generate(model, **kw):
    ids, mask = prompts()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kw)


@pytest.mark.parametrize("kind", list(HEADS))
def test_tokens_identical_with_and_without(kind):
    fused, plain = build(kind), build(kind, greedy_head=False)
    assert linears.kind(fused.get_output_embeddings()) == HEAD_KIND[kind]
    got, want = generate(fused), generate(plain)
    assert torch.equal(got, want)
    report = engine_runtime(fused).report()
    assert report["greedy_head_forwards"] == 12 and report["module_forwards"] == 0, report
    assert engine_runtime(plain).report()["greedy_head_forwards"] == 0


def test_one_hot_logits_of_the_argmax():
    model = build("w4a8")
    ids, mask = prompts()
    cache = EngineCache(model.config)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    cache = EngineCache(model.config)
    cache.greedy_head = True
    with torch.no_grad():
        hot = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    assert hot.shape == full.shape == (3, 1, 1001)
    assert torch.equal(hot.argmax(-1), full.argmax(-1)) and torch.equal(hot.sum(-1), torch.ones(3, 1))


@pytest.mark.parametrize("kw", [
    {"repetition_penalty": 1.3},
    {"min_new_tokens": 5},
    {"no_repeat_ngram_size": 2},
    {"suppress_tokens": [5]},
    {"bad_words_ids": [[7]]},
    {"output_scores": True, "return_dict_in_generate": True},
    {"output_logits": True, "return_dict_in_generate": True},
    {"logits_processor": LogitsProcessorList([MinLengthLogitsProcessor(15, 2)])},
    {"do_sample": True, "top_k": 1},
])
def test_not_used_when_generate_needs_the_logits(kw):
    model, plain = build("w4a8"), build("w4a8", greedy_head=False)
    kw = {"do_sample": False, **kw}
    ids, mask = prompts()
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw)
        want = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw)
    assert engine_runtime(model).report()["greedy_head_forwards"] == 0
    if kw.get("return_dict_in_generate"):
        got, want = got.sequences, want.sequences
    if not kw.get("do_sample"):
        assert torch.equal(got, want)
