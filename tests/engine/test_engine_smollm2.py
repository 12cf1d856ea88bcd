"""The engine on the real SmolLM2-135M: W4A8 + prompt lookup, W4A8 + quantized self-speculation and
W8A8 + prompt lookup token-identical to plain W4A8 / W8A8, and batch rows identical to single rows,
with and without speculation (the issue's failures on the module path)."""

from __future__ import annotations

import pytest
import torch

import infertrix as ix
from infertrix.engine import engine_runtime
from infertrix.speculative import speculative_stats

pytestmark = pytest.mark.smollm2
RECIPE = "w4a8(quantize_lm_head=true),engine"


@pytest.fixture(scope="module")
def loaded(smollm2):
    _, tok = smollm2
    plain, _ = ix.models.load("smollm2")
    ix.optimize(plain, RECIPE)
    spec, _ = ix.models.load("smollm2")
    ix.optimize(spec, RECIPE, "pld")
    return plain, spec, tok


def _gen(model, ids, mask, n=48):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=0)


def test_w4a8_prompt_lookup_is_token_identical(loaded):
    plain, spec, tok = loaded
    text = "The cat sat on the mat. The dog sat on the rug. The cat sat on the"
    enc = tok(text, return_tensors="pt")
    assert torch.equal(_gen(spec, enc.input_ids, enc.attention_mask), _gen(plain, enc.input_ids, enc.attention_mask))
    assert engine_runtime(spec).report()["module_forwards"] == 0


def test_w4a8_batch_rows_equal_single_rows(loaded):
    plain, _, tok = loaded
    texts = ["Once upon a time", "The capital of France is a city that", "List three colours:"]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    batch = _gen(plain, enc.input_ids, enc.attention_mask, n=24)
    for i, text in enumerate(texts):
        one = tok(text, return_tensors="pt")
        alone = _gen(plain, one.input_ids, one.attention_mask, n=24)
        assert torch.equal(batch[i, enc.input_ids.shape[1] :], alone[0, one.input_ids.shape[1] :]), text


TEXTS = ["The cat sat on the mat. The dog sat on the rug. The cat sat on the",
         "Once upon a time there was a little", "List three colours: red, green, blue. Again: red,"]


def _alone(model, tok, text, n):
    one = tok(text, return_tensors="pt")
    return _gen(model, one.input_ids, one.attention_mask, n)[0, one.input_ids.shape[1] :]


def test_w4a8_quantized_self_and_speculative_batches_are_token_identical(loaded, smollm2):
    plain, spec, tok = loaded
    model, _ = ix.models.load("smollm2")
    ix.optimize(model, RECIPE, "quantized_self")
    for text in TEXTS[:2]:
        assert torch.equal(_alone(model, tok, text, 40), _alone(plain, tok, text, 40)), text
    assert speculative_stats(model).report()["draft path"] == "engine, on the model's KV cache"
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    alone = [_alone(plain, tok, text, 32) for text in TEXTS]
    for m in (spec, model):  # prompt lookup and quantized self at batch 3: each row as alone, no fallback
        batch = _gen(m, enc.input_ids, enc.attention_mask, 32)
        for i, text in enumerate(TEXTS):
            row = batch[i, enc.input_ids.shape[1] :]  # a row that ends early is padded after its eos
            assert torch.equal(row[: len(alone[i])], alone[i]) and not row[len(alone[i]) :].any(), text
        assert engine_runtime(m).report()["module_forwards"] == 0


def test_w8a8_prompt_lookup_is_token_identical(smollm2):
    _, tok = smollm2
    plain, _ = ix.models.load("smollm2")
    ix.optimize(plain, "w8a8,engine")
    spec, _ = ix.models.load("smollm2")
    ix.optimize(spec, "w8a8,engine", "pld")
    for text in (TEXTS[0], TEXTS[2]):
        assert torch.equal(_alone(spec, tok, text, 48), _alone(plain, tok, text, 48)), text
    assert engine_runtime(spec).report()["module_forwards"] == 0
def test_w4a8_snapkv_prompt_lookup_is_token_identical(smollm2):
    """`w4a8,snapkv:0.5,pld` equals `w4a8,snapkv:0.5` (engine in both): the prompt runs on the engine
    too (quantized projections) and SnapKV scores it from the engine's queries, then steps and
    verification windows run on the engine over its evicted cache."""
    _, tok = smollm2
    models = []
    for extra in ([], ["pld"]):
        model, _ = ix.models.load("smollm2")
        ix.optimize(model, "w4a8(quantize_lm_head=true)", "snapkv:0.5", *extra, "engine")
        models.append(model)
    text = ("The cat sat on the mat. The dog sat on the rug. The bird sat on the branch. " * 4
            + "Where did the cat sit? The cat sat on the")
    enc = tok(text, return_tensors="pt")
    outs = [_gen(m, enc.input_ids, enc.attention_mask) for m in models]
    assert torch.equal(outs[1], outs[0])
    for m in models:
        report = engine_runtime(m).report()
        assert report["module_forwards"] == 0, report  # the prompt included
    kv = [t["report"] for t in ix.describe(models[1]).to_dict()["transforms"] if "tokens_stored" in t["report"]][0]
    assert kv["tokens_stored"] < kv["tokens_seen"]
