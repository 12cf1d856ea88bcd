"""Token-tree verification and the Lookahead drafter: greedy output identical to ``generate`` (batch 1
and 4, left padding), the multi-draft sampling rule exact in distribution (chi-square), the trie."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny
from test_spec_greedy_identity import padded_batch, plain_and_spec
from test_spec_sampling import (
    PROMPT,
    _small_model,
    chi2,
    chi2_critical,
    exact_distribution,
    sample_counts,
)

import infertrix as ix
from infertrix.speculative import Lookahead, NGramTrie, TokenTree
from infertrix.speculative import tree as spec_tree
from infertrix.speculative.drafter import Draft, Drafter
from infertrix.speculative.transform import SpeculativeDecoding

OFF = "engine(enabled=false)"  # tree verification on the module path


class RandomTrees(Drafter):
    """Trees of random branches; with ``oracle`` (per row: prompt length, plain generate's tokens)
    the true next tokens sit at a random sibling position among decoys, so long paths are accepted."""

    def __init__(self, vocab: int, oracle: list[tuple[int, list[int]]] | None, seed: int):
        self.vocab, self.oracle, self.rng = vocab, oracle, random.Random(seed)

    def _branch(self, tree: TokenTree, parent: int, truth: list[int], depth: int) -> None:
        if depth == 0:
            return
        toks = self.rng.sample(range(self.vocab), 3)
        if truth and truth[0] not in toks:
            toks[self.rng.randrange(3)] = truth[0]
        for tok in toks[: self.rng.choice([1, 2, 3])] if not truth else toks:
            tree.tokens.append(tok)
            tree.parents.append(parent)
            follow = truth[1:] if truth and tok == truth[0] else []
            if follow or self.rng.random() < 0.4:
                self._branch(tree, len(tree.tokens) - 1, follow, depth - 1)

    def propose(self, seqs, limits):
        trees = []
        for b, seq in enumerate(seqs):
            truth = []
            if self.oracle is not None:
                prompt_len, new = self.oracle[b]
                done = len(seq) - prompt_len  # tokens emitted so far
                truth = new[done : done + 3]
            tree = TokenTree()
            self._branch(tree, -1, truth, 3)
            trees.append(tree)
        return Draft([t.first_branch() for t in trees], trees=trees)


@dataclass
class TreeTest(SpeculativeDecoding):
    vocab: int = 128
    oracle: list | None = None
    seed: int = 0

    def make_drafter(self, model):
        return RandomTrees(self.vocab, self.oracle, self.seed)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("engine", [False, True])
def test_tree_greedy_identity_with_decoys(arch, batch, engine, monkeypatch):
    model = make_tiny(arch)
    ids, mask = padded_batch(batch, seed=3 + batch)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30)
    oracle = [(int(mask[b].sum()), ref[b, ids.shape[1] :].tolist()) for b in range(batch)]
    steps = []
    real_step = spec_tree.tree_step
    monkeypatch.setattr("infertrix.speculative.loop.tree_step", lambda *a: steps.append(1) or real_step(*a))
    t = TreeTest(oracle=oracle, seed=batch)
    ix.optimize(model, *([t] if engine else [t, OFF]))
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30)
    record = ix.speculative.speculative_stats(model)
    runtime = ix.engine.engine_runtime(model)
    counts = dict(runtime.counts) if runtime is not None else {}
    ix.restore(model)
    assert torch.equal(ref, out)
    assert steps and record.last.accepted > record.last.steps  # trees ran, and long paths were kept
    assert record.tree_path == "token trees"
    if engine:  # every forward, the trees' included, ran on the engine
        assert counts.get("engine", 0) > len(steps) and not [k for k in counts if k.startswith("module")], counts


@pytest.mark.parametrize("batch", [1, 4])
def test_tree_greedy_identity_random_trees_eager(batch):
    model = make_tiny("llama", attn_implementation="eager")
    ids, mask = padded_batch(batch, seed=11)
    ref, out, stats = plain_and_spec(model, [TreeTest(seed=5), OFF], ids, mask, max_new_tokens=20)
    assert torch.equal(ref, out)
    assert stats.drafted > 0


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_lookahead_greedy_identity(arch, adaptive, batch):
    model = make_tiny(arch)
    ids, mask = padded_batch(batch, seed=batch)
    t = Lookahead(max_nodes=12, depth=6, adaptive=adaptive)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    ix.optimize(model, t)
    try:
        outs = [model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24) for _ in range(2)]
        stats = ix.speculative.speculative_stats(model).last
    finally:
        ix.restore(model)
    assert all(torch.equal(ref, o) for o in outs)
    if not adaptive:  # the second call drafts from the first call's output: long paths
        assert stats.accepted > stats.steps


def test_lookahead_falls_back_to_a_branch_on_sliding_windows():
    model = make_tiny("gemma3")
    ids, mask = padded_batch(1, seed=2)
    ref, out, stats = plain_and_spec(model, Lookahead(adaptive=False), ids, mask, max_new_tokens=20)
    assert torch.equal(ref, out)


def test_trie_counts_windows_and_stays_bounded():
    trie = NGramTrie(depth=3, max_nodes=1000)
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3]
    nxt = trie.add(seq[:5], 0)
    nxt = trie.add(seq, nxt)  # only the new windows are counted
    assert nxt == len(seq) - 2
    node = trie.match([9, 1, 2], prefix=2)
    assert node is not None and {t: c[0] for t, c in node[1].items()} == {3: 2, 4: 1}
    small = NGramTrie(depth=4, max_nodes=1000)
    rng = random.Random(0)
    small.add([rng.randrange(1000) for _ in range(2000)], 0)
    assert small.nodes <= 1000


def test_tree_sampling_follows_model_distribution():
    torch.manual_seed(4321)
    model = _small_model()
    kw = dict(temperature=0.7, top_k=3, top_p=1.0)
    exact = exact_distribution(model, PROMPT, 0.7, 3)
    ix.optimize(model, TreeTest(vocab=6, seed=1), OFF)
    counts = sample_counts(model, PROMPT, calls=2, rows=1000, **kw)
    st = ix.speculative.speculative_stats(model).total
    ix.restore(model)
    assert st.drafted > 300 and 0 < st.accepted < st.drafted
    stat, df = chi2(counts, exact)
    assert stat < chi2_critical(df), (stat, df)


def test_tree_chi_square_detects_a_wrong_rule(monkeypatch):
    """Power check: a rule that takes the first sibling the target allows at all is caught."""
    torch.manual_seed(98)
    model = _small_model()
    exact = exact_distribution(model, PROMPT, 0.7, 3)

    def first_allowed(p, children):
        for slot, tok in children:
            if float(p[tok]) > 0:
                return slot, p
        return None, p

    monkeypatch.setattr(spec_tree, "_multi_draft", first_allowed)
    ix.optimize(model, TreeTest(vocab=6, seed=1), OFF)
    counts = sample_counts(model, PROMPT, calls=1, rows=1000, temperature=0.7, top_k=3, top_p=1.0)
    ix.restore(model)
    stat, df = chi2(counts, exact)
    assert stat > chi2_critical(df)
