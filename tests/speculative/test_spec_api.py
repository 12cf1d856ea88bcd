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
    assert model.speculative_stats.last.accepted > 0
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
    rec = model.speculative_stats
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
    (t,) = ix.core.api.applied_transforms(model)
    assert isinstance(t, PromptLookup) and t.num_tokens == 6 and t.max_ngram == 4
    assert "generate" in model.__dict__ and hasattr(model, "speculative_stats")
    ix.restore(model)
    assert "generate" not in model.__dict__ and not hasattr(model, "speculative_stats")
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
    assert model.speculative_stats.total.calls == 0  # transformers' own assisted path ran


def test_errors():
    model = make_tiny("llama")
    ids, mask = prompts(2)
    with pytest.raises(ConfigError, match="num_tokens"):
        PromptLookup(num_tokens=0)
    with pytest.raises(ConfigError, match="min_ngram"):
        PromptLookup(min_ngram=3, max_ngram=2)
    with pytest.raises(ConfigError, match="needs a draft model"):
        DraftModel()
    with pytest.raises(ConfigError, match="plan=callable"):
        SelfSpeculative()
    with pytest.raises(ConfigError, match="max_step_tokens"):
        PromptLookup(max_step_tokens=1)
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
    ix.optimize(gemma, PromptLookup(num_tokens=4))
    gids = torch.tensor([[0, 0, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 9, 10, 11, 9, 10, 11, 9, 10, 11]])
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        gemma.generate(gids, attention_mask=(gids != 0).long(), do_sample=False, max_new_tokens=20)


def test_adaptive_length_follows_acceptance():
    from infertrix.speculative import AdaptiveLength

    a = AdaptiveLength(4, minimum=1, maximum=8)
    a.update([4, 4], [4, 4])  # all accepted: grow by 2
    assert a.length == 6
    a.update([6, 0], [6, 0])  # rows that drafted nothing do not count
    assert a.length == 8
    a.update([8], [8])  # capped
    assert a.length == 8
    for _ in range(10):
        a.update([8, 8], [8, 3])  # a rejection: shrink by 1, down to the minimum
    assert a.length == 1


def test_draft_confidence_stops_drafting():
    model = make_tiny("llama")
    ids, mask = prompts(1)
    draft = make_tiny("llama", seed=4, num_hidden_layers=1)
    ix.optimize(model, DraftModel(draft=draft, num_tokens=6, adaptive=False, confidence=0.0))
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    eager = model.speculative_stats.last
    ix.restore(model)
    # a random tiny draft is never 99% sure: it stops after one token each step
    ix.optimize(model, DraftModel(draft=draft, num_tokens=6, adaptive=False, confidence=0.99))
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    shy = model.speculative_stats.last
    assert shy.drafted <= shy.steps  # at most one draft token per verification
    assert eager.drafted > eager.steps
