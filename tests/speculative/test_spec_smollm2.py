"""Speculative decoding on the real SmolLM2-135M-Instruct: greedy identity, batches, pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

import infertrix as ix
from infertrix import eval as ixe

pytestmark = pytest.mark.smollm2


def chat_batch(tok, n):
    text = ixe.text.body_text()
    starts = ["It is a truth universally", "Mr. Bennet was among", "Within a short walk", "Elizabeth, feeling"]
    prompts = []
    for s in starts[:n]:
        i = text.find(s)
        prompts.append("Rewrite in the present tense:\n\n" + text[i : i + 60 + 90 * len(prompts)])
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("batch", [1, 4])
def test_prompt_lookup_greedy_identity(smollm2, batch):
    model, tok = smollm2
    enc = chat_batch(tok, batch)
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
    ix.optimize(model, ix.speculative.PromptLookup(num_tokens=8))
    try:
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        stats = ix.speculative.speculative_stats(model).last
    finally:
        ix.restore(model)
    assert torch.equal(ref, out)
    assert stats.accepted > 0


def test_draft_model_greedy_identity(smollm2):
    model, tok = smollm2
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:6]
    draft.config.num_hidden_layers = 6
    enc = chat_batch(tok, 2)
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False)
    ix.optimize(model, ix.speculative.DraftModel(draft=draft, num_tokens=3, adaptive=False))
    try:
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
        assert ix.speculative.speculative_stats(model).last.drafted > 0
    finally:
        ix.restore(model)
    assert torch.equal(ref, out)


def test_pipeline_runs_unchanged(smollm2):
    from transformers import pipeline

    model, tok = smollm2
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    chat = [{"role": "user", "content": "Repeat after me: the quick brown fox jumps over the lazy dog."}]
    ref = pipe(chat, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]["content"]
    ix.optimize(model, "pld")
    try:
        out = pipe(chat, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]["content"]
        assert ix.speculative.speculative_stats(model).total.calls == 1
    finally:
        ix.restore(model)
    assert out == ref
