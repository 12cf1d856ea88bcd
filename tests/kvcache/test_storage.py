"""The storage split: a score-only method is one small class, caches say what they can undo, the
storage contract an engine writes through, and no import cycles inside infertrix.kvcache."""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import torch
from conftest import make_tiny
from torch import Tensor
from transformers.cache_utils import DynamicCache

import infertrix as ix
import infertrix.kvcache as kv
from infertrix.kvcache import KVPolicy, ScoreContext, new_cache


@dataclass
class ValueNorm(KVPolicy):
    """Keep the tokens whose values have the largest L2 norm (a throwaway method: it only scores)."""

    def score(self, ctx: ScoreContext) -> Tensor:
        return ctx.values.float().norm(dim=-1)


def test_a_score_only_policy_works_through_optimize_and_generate():
    model = make_tiny("llama")
    ix.optimize(model, ValueNorm(compression=0.5))
    ids = torch.randint(3, 128, (2, 24))
    cache = new_cache(model)
    model(ids, cache=cache)
    assert cache.stored_lengths() == [12] * 4 and cache.get_seq_length() == 24
    full = DynamicCache(config=model.config)
    model(ids, cache=full)
    values = full.layers[0].values  # [2, 2, 24, 16]: the 12 of largest norm are kept, in order
    keep = values.norm(dim=-1).topk(12, dim=-1).indices.sort(dim=-1).values
    want = torch.gather(values, 2, keep[..., None].expand(-1, -1, -1, values.shape[-1]))
    assert torch.equal(cache.layers[0].values, want)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 30)
    report = ix.describe(model).transforms[0]["report"]
    assert report["tokens_seen"] == 29 and report["tokens_stored"] == 12 + 5
    ix.restore(model)
    ix.optimize(model, ValueNorm(compression=0.0))  # ratio 0 keeps everything: the plain model's tokens
    same = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ix.restore(model)
    assert torch.equal(same, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_caches_say_what_they_can_undo():
    model = make_tiny("llama")
    growing = kv.capabilities(kv.GrowingCache(model.config))
    assert growing == kv.CacheCapabilities("any", select_rows=True, ragged_rows=True)
    assert kv.capabilities(DynamicCache(config=model.config)).select_rows
    ix.optimize(model, kv.SnapKV(window_size=4, compression=0.5))
    policy = kv.capabilities(new_cache(model))
    assert policy == kv.CacheCapabilities("recent", select_rows=False, ragged_rows=False)
    gemma = make_tiny("gemma3", num_hidden_layers=4)
    assert kv.full_attention_layers(gemma.config) == [1, 3]
    assert not kv.capabilities(kv.GrowingCache(gemma.config)).select_rows  # sliding layers


def test_an_engine_appends_through_reserve_and_commit():
    """Writing tokens into the buffers after ``reserve`` and then ``commit`` is what ``update`` does."""
    a, b = kv.EvictingLayer(), kv.EvictingLayer()
    for n in (5, 1, 40, 1):
        k, v = torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
        a.update(k, v)
        if not b.is_initialized:
            b.lazy_initialization(k, v)
        s = b.reserve(n, k, v)
        b.kbuf[:, :, s : s + n] = k
        b.vbuf[:, :, s : s + n] = v
        b.commit(n)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert b.keys.data_ptr() == b.kbuf.data_ptr() and b.cumulative_length == a.cumulative_length


def test_no_import_cycles_in_kvcache():
    root = pathlib.Path(kv.__file__).parent
    graph = {}
    for f in root.glob("*.py"):
        deps = set()
        for node in ast.parse(f.read_text()).body:  # module level: what runs on import
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[f.stem] = deps & {p.stem for p in root.glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    assert [m for m in graph if m != "__init__" and reaches(m, m, set())] == []
