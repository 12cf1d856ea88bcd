"""The Jacobi lookahead drafter: greedy output identical to ``generate`` (batch 1 and 4 with left
padding, engine on and off), the harvest of every slot's argmax, a bounded pool, recipes, sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_spec_greedy_identity import padded_batch, plain_and_spec

import infertrix as ix
from infertrix.core.transform import ConfigError
from infertrix.speculative import DraftContext, Jacobi, JacobiDrafter
from infertrix.speculative.jacobi import JacobiMemory
from infertrix.speculative.lookahead import NGramTrie
from infertrix.speculative.state import prepared

OFF = "engine(enabled=false)"  # the module path, where token trees are verified


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("engine", ["on", "off"])
def test_greedy_identity(arch, batch, engine):
    model = make_tiny(arch)
    ids, mask = padded_batch(batch, seed=batch)
    t = Jacobi(window=3, ngram=3, max_nodes=6, adaptive=False)
    ref, out, stats = plain_and_spec(model, [t] if engine == "on" else [t, OFF], ids, mask, max_new_tokens=24)
    assert torch.equal(ref, out)
    assert stats.drafted > 0 and stats.tokens == batch * 24


@pytest.mark.parametrize("engine", ["on", "off"])
def test_greedy_identity_adaptive_behind_the_guard(engine):
    model = make_tiny("llama")
    ids, mask = padded_batch(4, seed=5)
    t = Jacobi()
    ref, out, _ = plain_and_spec(model, [t] if engine == "on" else [t, OFF], ids, mask, max_new_tokens=24)
    assert torch.equal(ref, out)


def _drafter(window=3, ngram=3) -> JacobiDrafter:
    d = JacobiDrafter(JacobiMemory(NGramTrie(ngram, 10_000)), window, ngram, max_nodes=4, prompt_ngrams=False,
                      adaptive=False)
    d.start(None, DraftContext(False, 1, 0, lambda x: x))
    return d


def test_harvest_of_unaccepted_slots_and_jacobi_guesses():
    d = _drafter()
    seq = [5, 6, 7]
    draft = d.propose([seq], [8])
    tail = draft.tokens[0]
    assert len(tail) == 3  # nothing in the pool yet: a Jacobi tail of prompt tokens
    fed = [seq[-1], *tail]
    argmax = [40, 41, 42, 43]  # the model's output after each fed slot
    d.observe_window([fed], [argmax], None)
    node = d.pool.match([fed[1], fed[2]], 2)  # guess, guess -> the model's output there
    assert node is not None and 42 in node[1]
    assert d.pool.match([6, 7], 2)[1].keys() == {40}  # the root's true next token
    # the model's 40 was emitted (no draft accepted): the next guesses are its outputs beyond it
    assert d.guesses(0, len(seq) + 1) == [41, 42, 43]
    assert d.propose([[*seq, 40]], [8]).tokens[0][:3] == [41, 42, 43]


def test_harvested_ngrams_are_accepted_when_the_output_repeats():
    model = make_tiny("llama", seed=3)
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    t = Jacobi(window=2, ngram=3, prompt_ngrams=False, adaptive=False)  # the pool holds only harvested n-grams
    ref, out, stats = plain_and_spec(model, t, ids, mask, max_new_tokens=48)
    assert torch.equal(ref, out)
    gen = ref[0, ids.shape[1]:].tolist()
    assert len(set(gen)) < len(gen) // 2  # this tiny model's greedy output repeats itself
    assert stats.accepted > 0 and stats.mean_accepted_length > 1.2


def test_pool_is_bounded():
    model = make_tiny("llama")
    ids, mask = padded_batch(4, seed=2)
    t = Jacobi(window=6, ngram=4, max_pool=64, adaptive=False)
    ix.optimize(model, t)
    try:
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
        pool = prepared(model, t).pool
    finally:
        ix.restore(model)
    # halved whenever it passes the bound; one harvest adds at most (slots x ngram) nodes
    assert 0 < pool.nodes <= 64 + 4 * (1 + 6 + 8) * 4


def test_recipes_and_errors():
    (t,) = ix.parse_recipe("jacobi:6(ngram=4,max_nodes=2)")
    assert isinstance(t, Jacobi) and (t.window, t.ngram, t.max_nodes) == (6, 4, 2)
    assert isinstance(ix.parse_recipe("lookahead_decoding")[0], Jacobi)
    with pytest.raises(ConfigError, match="ngram >= 2"):
        Jacobi(ngram=1)
    with pytest.raises(ConfigError, match="window >= 0"):
        Jacobi(window=-1)


@pytest.mark.parametrize("engine", ["on", "off"])
def test_sampling_runs(engine):
    model = make_tiny("qwen2")
    ids, mask = padded_batch(2, seed=4)
    ix.optimize(model, *([Jacobi(adaptive=False)] + ([] if engine == "on" else [OFF])))
    try:
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, max_new_tokens=20)
        stats = ix.speculative.speculative_stats(model).last
    finally:
        ix.restore(model)
    assert out.shape == (2, ids.shape[1] + 20)
    assert stats.drafted > 0 and stats.tokens == 40
