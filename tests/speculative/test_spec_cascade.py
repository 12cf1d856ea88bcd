"""Cascade drafting: the quantized self-draft checks n-gram guesses per forward (vertical) and the
n-gram model extends its drafts (horizontal); outputs stay token-identical to plain decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_spec_greedy_identity import _spec_path, padded_batch

import infertrix as ix
from infertrix.core.transform import ConfigError
from infertrix.speculative import Cascade
from infertrix.speculative.cascade import CascadeDrafter, continuation
from infertrix.speculative.lookahead import NGramTrie


@pytest.fixture
def drafters(monkeypatch):
    """Every CascadeDrafter started during the test."""
    seen = []
    start = CascadeDrafter.start
    monkeypatch.setattr(CascadeDrafter, "start", lambda self, model, ctx: seen.append(self) or start(self, model, ctx))
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("engine", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_cascade_is_token_identical(arch, engine, batch, drafters):
    model = make_tiny(arch)
    ids, mask = padded_batch(batch, seed=4)
    base = [] if engine else ["engine(enabled=false)"]
    ref, out, stats, path = _spec_path(model, [*base, Cascade(adaptive=False, confidence=0.0)], ids, mask)
    assert torch.equal(ref, out) and stats.drafted > 0 and stats.accepted > 0
    assert path.endswith("on the model's KV cache")
    d = drafters[-1]
    if batch == 1:  # the draft checked n-gram guesses: fewer draft forwards than draft tokens
        assert d.kept_guesses > 0 and d.forwards < d.vertical_tokens
    else:  # rows of a batch draft one token per forward
        assert d.forwards == 0 and d.guessed == 0


def test_the_tail_extends_drafts_and_counts_them(drafters):
    model = make_tiny("llama")
    ids, mask = padded_batch(1, seed=4)
    ref, out, stats, _ = _spec_path(model, [Cascade(adaptive=False, confidence=0.0, guess=0, tail=3)], ids, mask)
    assert torch.equal(ref, out)
    assert drafters[-1].tail_tokens > 0 and drafters[-1].forwards == 0  # tail only


def test_sampling_runs_with_one_token_draft_forwards(drafters):
    model = make_tiny("llama")
    ids, mask = padded_batch(1, seed=4)
    ix.optimize(model, Cascade(adaptive=False, confidence=0.0))
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.7, max_new_tokens=16)
    finally:
        ix.restore(model)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 16
    assert drafters[-1].forwards == 0 and drafters[-1].tail_tokens == 0


def test_continuation_needs_two_matched_tokens_and_takes_the_most_counted():
    trie = NGramTrie(depth=5, max_nodes=1000)
    trie.add([1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 6], 0)
    assert continuation(trie, [7, 1, 2, 3], prefix=3, most=2) == [4, 5]  # 4 follows "1 2 3" twice, 9 once
    assert continuation(trie, [7, 8, 3], prefix=3, most=2) == []  # only "3" matches: too short a match
    assert continuation(trie, [1, 2], prefix=3, most=0) == []


@pytest.mark.parametrize("kw", [{"prefix": 1}, {"guess": -1}, {"tail": -2}, {"shared_cache": False}, {"max_trie_nodes": 10}])
def test_bad_configs_are_refused(kw):
    with pytest.raises(ConfigError):
        Cascade(**kw).validate()


def test_recipe_name():
    (t,) = ix.parse_recipe("cascade(guess=6,tail=0)")
    assert isinstance(t, Cascade) and t.guess == 6 and t.tail == 0
