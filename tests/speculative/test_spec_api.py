"""Streamers, stopping criteria, statistics, recipes, restore and error messages."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import infertrix as ix
from infertrix.core import ConfigError, ConflictError, UnsupportedModelError
from infertrix.speculative import DraftModel, PromptLookup, SelfSpeculative


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls, self.ended = [], 0

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.ended += 1


def prompts(batch=2):
    ids = torch.tensor([[0, 0, 5, 9, 11, 5, 9, 11, 5, 9], [7, 8, 20, 21, 7, 8, 20, 21, 7, 8]])[:batch]
    mask = (ids != 0).long()
    return ids, mask


@pytest.mark.parametrize("batch", [1, 2])
def test_streamer_receives_what_plain_generate_sends(batch):
    model = make_tiny("llama")
    ids, mask = prompts(batch)
    ref_stream, spec_stream = Recorder(), Recorder()
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=15, streamer=ref_stream)
    ix.optimize(model, PromptLookup(num_tokens=5))
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=15, streamer=spec_stream)
    assert torch.equal(ref, out)
    assert ix.speculative.speculative_stats(model).last.accepted > 0
    assert spec_stream.ended == ref_stream.ended == 1
    assert len(spec_stream.calls) == len(ref_stream.calls)
    for a, b in zip(spec_stream.calls, ref_stream.calls, strict=True):
        assert torch.equal(a, b)


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("with_eos", [True, False])
def test_custom_stopping_criterion(with_eos):
    model = make_tiny("qwen2")
    ids, mask = prompts(2)
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    token = int(free[1, ids.shape[1] + 4])  # row 1 stops early, row 0 maybe later or never
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=20,
              stopping_criteria=StoppingCriteriaList([StopAfterToken(token)]))
    if not with_eos:
        kw["eos_token_id"] = None  # no eos criterion: finished rows keep producing real tokens
    ref = model.generate(ids, **kw)
    ix.optimize(model, PromptLookup(num_tokens=5))
    out = model.generate(ids, **kw)
    assert torch.equal(ref, out)
    new = out[1, ids.shape[1] :].tolist()
    assert token in new  # row 1 did reach its stop token
    if with_eos:  # and everything after it is padding
        assert all(t == model.generation_config.pad_token_id for t in new[new.index(token) + 1 :])


def test_stats_and_describe():
    model = make_tiny("llama")
    ids, mask = prompts(2)
    ix.optimize(model, "pld:4")
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    rec = ix.speculative.speculative_stats(model)
    assert rec.total.calls == 2 and rec.last.calls == 1
    assert rec.total.tokens == 2 * rec.last.tokens == 48
    assert rec.last.accepted <= rec.last.drafted
    assert rec.last.mean_accepted_length >= 1.0
    assert rec.last.draft_seconds > 0 and rec.last.verify_seconds > 0
    report = ix.describe(model).transforms[0]["report"]
    assert report["last call"]["tokens"] == 24 and "mean_accepted_length" in report["last call"]
    assert ix.speculative.speculative_stats(model) is rec


def test_restore_and_recipes():
    model = make_tiny("llama")
    ix.optimize(model, "pld:6(max_ngram=4)")
    t, engine = ix.core.api.applied_transforms(model)
    assert engine.name == "engine"  # on by default
    assert isinstance(t, PromptLookup) and t.num_tokens == 6 and t.max_ngram == 4
    assert "generate" in model.__dict__ and ix.speculative.speculative_stats(model).total.calls == 0
    ix.restore(model)
    assert "generate" not in model.__dict__ and "_infertrix" not in model.__dict__
    with pytest.raises(ValueError, match="no speculative transform is applied"):
        ix.speculative.speculative_stats(model)
    assert ix.parse_recipe("copyspec")[0].name == "prompt_lookup"


def test_pipeline_style_return_dict():
    model = make_tiny("llama")
    ids, mask = prompts(1)
    ix.optimize(model, "pld")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape == (1, ids.shape[1] + 5)


def test_caller_custom_generate_and_assistant_bypass():
    model = make_tiny("llama")
    ids, mask = prompts(1)
    ix.optimize(model, "pld")
    model.generate(ids, attention_mask=mask, max_new_tokens=4, assistant_model=make_tiny("llama", seed=3))
    assert ix.speculative.speculative_stats(model).total.calls == 0  # transformers' own assisted path ran


def test_errors():
    model = make_tiny("llama")
    ids, mask = prompts(2)
    with pytest.raises(ConfigError, match="num_tokens"):
        PromptLookup(num_tokens=0)
    with pytest.raises(ConfigError, match="min_ngram"):
        PromptLookup(min_ngram=3, max_ngram=2)
    with pytest.raises(ConfigError, match="needs a draft model"):
        DraftModel()
    with pytest.raises(ConfigError, match="plan=SkipPlan"):
        SelfSpeculative(plan=[42])
    with pytest.raises(ConfigError, match="needs a draft model"):  # a recipe string cannot carry a model
        ix.parse_recipe("draft_model")
    other = make_tiny("llama", vocab_size=160)
    with pytest.raises(UnsupportedModelError, match="same tokenizer"):
        ix.optimize(model, DraftModel(draft=other))
    other_eos = make_tiny("llama", eos_token_id=5)
    with pytest.raises(UnsupportedModelError, match="eos_token_id"):
        ix.optimize(model, DraftModel(draft=other_eos))
    ix.optimize(model, PromptLookup())
    with pytest.raises(ConflictError, match="decoding"):
        ix.optimize(model, DraftModel(draft=make_tiny("llama", seed=2)))
    with pytest.raises(ConfigError, match="num_beams"):
        model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=3)
    with pytest.raises(ConfigError, match="output_scores"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    gemma = make_tiny("gemma3")
    ix.optimize(gemma, PromptLookup(num_tokens=4), "engine(enabled=false)")
    gids = torch.tensor([[0, 0, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 9, 10, 11, 9, 10, 11, 9, 10, 11]])
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        gemma.generate(gids, attention_mask=(gids != 0).long(), do_sample=False, max_new_tokens=20)
    ix.restore(gemma)  # on the engine (the default) the rows stay aligned, so the window is no problem
    ix.optimize(gemma, PromptLookup(num_tokens=4))
    assert gemma.generate(gids, attention_mask=(gids != 0).long(), do_sample=False, max_new_tokens=20).shape == (2, 32)


def test_acceptance_rate_counts_tested_positions():
    from infertrix.speculative import AcceptanceRate

    r = AcceptanceRate(prior_accepted=1, prior_rejected=1, decay=1.0)
    r.update(4, 4)  # 4 accepted, nothing rejected
    r.update(4, 1)  # 1 accepted, then a rejection (positions after it were never tested)
    r.update(0, 0)  # nothing drafted: no evidence
    assert r.rate == pytest.approx((1 + 5) / (1 + 5 + 1 + 1))


def test_best_length_follows_acceptance_and_cost():
    from infertrix.speculative import VerifyCost, best_length, expected_tokens

    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    free = VerifyCost()
    for w in range(1, 12):
        free.observe(w, 0.040)  # verification costs the same at every width
    assert best_length([0.9], [10], free) == 10  # then draft all there is
    assert best_length([0.9], [3], free) == 3  # never beyond what the row can draft
    assert best_length([None], [10], free) == 0  # nothing to draft: a plain step
    steep = VerifyCost()
    steep.observe(1, 0.040)
    steep.observe(11, 0.120)  # 8 ms per extra position, learnt from two widths
    assert steep.time(6) == pytest.approx(0.080)
    assert best_length([0.1], [10], steep) == 0  # a poor match is not worth verifying
    k = best_length([0.8], [10], steep)
    assert 1 <= k < 10
    assert best_length([0.95], [10], steep) > k  # better acceptance, longer drafts
    assert best_length([0.8], [10], steep, draft_seconds=0.030) < k  # costly drafting, shorter drafts
    # a batch: rows without a match still count one token each
    assert best_length([0.8, None, None, None], [10, 0, 0, 0], steep) <= k


def test_draft_confidence_stops_drafting():
    model = make_tiny("llama")
    ids, mask = prompts(1)
    draft = make_tiny("llama", seed=4, num_hidden_layers=1)
    ix.optimize(model, DraftModel(draft=draft, num_tokens=6, adaptive=False, confidence=0.0))
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    eager = ix.speculative.speculative_stats(model).last
    ix.restore(model)
    # a random tiny draft is never 99% sure: it stops after one token each step
    ix.optimize(model, DraftModel(draft=draft, num_tokens=6, adaptive=False, confidence=0.99))
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    shy = ix.speculative.speculative_stats(model).last
    assert shy.drafted <= shy.steps  # at most one draft token per verification
    assert eager.drafted > eager.steps
