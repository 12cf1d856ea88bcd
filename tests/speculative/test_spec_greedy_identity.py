"""Greedy speculative decoding gives exactly the tokens of plain ``generate``, for every drafter,
batch 1 and batch 4 with left padding, stopping by eos per row, and history-dependent processors."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.skip import SkipPlan, UniformSkip
from infertrix.speculative import DraftModel, PromptLookup, QuantizedSelf, SelfSpeculative
from infertrix.speculative.aligned import AlignedKV
from infertrix.speculative.ragged import RaggedKV


def padded_batch(rows: int, seed: int = 0, vocab: int = 128, lengths=(24, 17, 21, 9)):
    """Left-padded prompts with internal repetition (so n-gram drafts hit)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths[:rows])
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b in range(rows):
        n = lengths[b]
        half = torch.randint(3, vocab, ((n + 1) // 2,), generator=g)
        row = torch.cat([half, half])[:n]
        ids[b, width - n :] = row
        mask[b, width - n :] = 1
    return ids, mask


def drafters():
    return {
        "pld": lambda: PromptLookup(num_tokens=6),
        "pld_adaptive": lambda: PromptLookup(num_tokens=4, adaptive=True, max_ngram=2),
        "draft_model": lambda: DraftModel(draft=make_tiny("llama", seed=7, num_hidden_layers=1), num_tokens=4, adaptive=False),
        "quantized_self": lambda: QuantizedSelf(adaptive=False),
        "quantized_self_w4": lambda: QuantizedSelf(weight_bits=4, group_size=32, adaptive=False),
    }


def plain_and_spec(model, transform, ids, mask, **kw):
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    ix.optimize(model, *(transform if isinstance(transform, list) else [transform]))
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        stats = ix.speculative.speculative_stats(model).last
    finally:
        ix.restore(model)
    return ref, out, stats


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("drafter", list(drafters()))
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_identity(arch, drafter, batch):
    model = make_tiny(arch)
    ids, mask = padded_batch(batch, seed=batch)
    ref, out, stats = plain_and_spec(model, drafters()[drafter](), ids, mask, max_new_tokens=24)
    assert torch.equal(ref, out)
    assert stats.drafted > 0  # drafts were actually proposed and verified
    assert stats.tokens == batch * 24


@pytest.mark.parametrize("drafter", ["pld", "draft_model"])
def test_greedy_identity_sliding_window_batch1(drafter):
    model = make_tiny("gemma3")  # sliding window 8: the cache rolls past the window
    ids, mask = padded_batch(1, seed=3)
    ref, out, stats = plain_and_spec(model, drafters()[drafter](), ids, mask, max_new_tokens=30)
    assert torch.equal(ref, out)
    assert stats.drafted > 0


@pytest.mark.parametrize("drafter", ["pld", "quantized_self"])
def test_eos_stops_rows_separately_and_pads(drafter, monkeypatch):
    model = make_tiny("llama")
    ids, mask = padded_batch(4, seed=11)
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30)
    # make a token that row 0 emits mid-way the eos, so rows stop at different steps
    eos = int(free[0, ids.shape[1] + 5])
    batches = []  # rows in the verification forwards: finished rows leave them (RaggedKV.retire)
    for kind in (RaggedKV, AlignedKV):  # the module path's rows, the engine's aligned rows
        monkeypatch.setattr(kind, "_extend", lambda self, rows, keep, extend=kind._extend:
                            batches.append(len(rows)) or extend(self, rows, keep))
    ref, out, stats = plain_and_spec(
        model, drafters()[drafter](), ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(ref, out)
    assert max(batches) == 4 and min(batches) < 4
    assert (out[:, ids.shape[1] :] == eos).any(dim=1).any()
    assert ref.shape[1] < ids.shape[1] + 30 or (ref[:, ids.shape[1]:] == 0).any()


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 5}])
def test_history_dependent_processors(kw):
    model = make_tiny("qwen2")
    ids, mask = padded_batch(2, seed=5)
    ref, out, stats = plain_and_spec(model, PromptLookup(num_tokens=5), ids, mask, max_new_tokens=20, **kw)
    assert torch.equal(ref, out)
    assert stats.drafted > 0


def test_no_attention_mask_and_max_length():
    model = make_tiny("llama")
    ids, _ = padded_batch(1, seed=2)
    ref = model.generate(ids, do_sample=False, max_length=ids.shape[1] + 13)
    ix.optimize(model, "pld:4")
    out = model.generate(ids, do_sample=False, max_length=ids.shape[1] + 13)
    assert torch.equal(ref, out) and out.shape[1] == ids.shape[1] + 13


class PassThrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skip_last_layers(n: int):
    """A test plan: the last ``n`` decoder layers pass their input through (restored on exit)."""

    @contextmanager
    def activate(model):
        layers = model.model.layers
        saved = list(layers)
        for i in range(len(layers) - n, len(layers)):
            layers[i] = PassThrough()
        try:
            yield
        finally:
            for i, layer in enumerate(saved):
                layers[i] = layer

    return activate


@pytest.mark.parametrize("batch", [1, 4])
def test_self_speculative_greedy_identity(batch):
    model = make_tiny("llama")
    ids, mask = padded_batch(batch, seed=21)
    plan = SkipPlan.of(layers=[2], attention=[3])  # a skip-family plan, active around each draft forward
    ref, out, stats = plain_and_spec(model, SelfSpeculative(plan=plan), ids, mask, max_new_tokens=20)
    assert torch.equal(ref, out)
    assert stats.drafted > 0
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)  # plan left


def test_self_speculative_any_context_manager():
    model = make_tiny("llama")
    ids, mask = padded_batch(1, seed=21)
    ref, out, stats = plain_and_spec(model, SelfSpeculative(plan=skip_last_layers(2)), ids, mask, max_new_tokens=20)
    assert torch.equal(ref, out)
    assert stats.drafted > 0
    assert all(not isinstance(layer, PassThrough) for layer in model.model.layers)


def test_self_speculative_plan_search():
    model = make_tiny("llama")
    ids, mask = padded_batch(2, seed=8)
    plans = [SkipPlan.of(layers=[1, 2, 3]), SkipPlan.of(mlp=[3]), UniformSkip(count=1)]
    t = SelfSpeculative(plan=plans, search_steps=3)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    ix.optimize(model, t)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    search = t.plan_search(model)  # kept in the model's record while applied
    ix.restore(model)
    assert torch.equal(ref, out)
    assert len(search.names) == 3 and search.best in (0, 1, 2)
    assert all(s > 0 for s in search.seconds) and all(n > 0 for n in search.tokens)
    assert search.rates()[search.best] == max(search.rates())
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)


@pytest.mark.parametrize("bits,layer", [(8, "W8A8Linear"), (4, "W4A8Linear")])
def test_quantized_self_shares_weights_and_reports_memory(bits, layer):
    model = make_tiny("llama")
    t = QuantizedSelf(weight_bits=bits, group_size=32)
    ids, mask = padded_batch(4, seed=4)
    ref, out, stats = plain_and_spec(model, t, ids, mask, max_new_tokens=16)
    assert torch.equal(ref, out)
    draft = t.draft_for(model)
    assert draft is not model and draft.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert draft.model.norm.weight is model.model.norm.weight
    assert type(draft.model.layers[0].mlp.up_proj).__name__ == layer
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the target stays float
    assert type(draft.lm_head).__name__ == layer and type(model.lm_head) is torch.nn.Linear
    assert "generate" not in draft.__dict__ and "_infertrix" in draft.__dict__  # its own quant state only
    ix.optimize(model, t)
    report = ix.describe(model)
    ix.restore(model)
    assert report.transforms[0]["report"]["draft_bytes"] > 0 and "draft_bytes: " in str(report)


def test_ragged_retire_drops_rows_and_keeps_the_others_logits():
    model = make_tiny("llama")
    ids, mask = padded_batch(3, seed=3)
    from transformers import DynamicCache

    def fresh():
        kv = RaggedKV(model, DynamicCache(config=model.config), 0)
        kv.prefill(ids, mask)
        kv.extend([[5, 6], [7], [8, 9]])
        kv.keep_fed([2, 1, 1])
        return kv

    full, part = fresh(), fresh()
    part.retire([1])
    assert part.present == [0, 2] and part.cache.layers[0].keys.shape[0] == 2
    feed = [[10, 11, 12], [], [13]]
    a, b = full.extend(feed), part.extend(feed)
    assert b.shape == a.shape and not b[1].any()
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(b[2, :1], a[2, :1], rtol=0, atol=1e-5)
    part.keep_fed([1, 0, 1])
    late = fresh()  # retiring between an extend and its keep_fed keeps the feed's rows aligned
    late.extend([[3], [4], [5, 6]])
    late.retire([0])
    late.keep_fed([0, 1, 2])
    assert late.present == [1, 2] and late.pos.tolist() == [int(mask[1].sum()) + 2, int(mask[2].sum()) + 3]
    assert part.pos.tolist() == [int(mask[0].sum()) + 3, int(mask[2].sum()) + 2]  # the present rows' kept tokens
    with pytest.raises(ValueError, match="retired"):
        part.extend([[1], [2], [3]])
    part.retire([0, 2])  # never empties the batch
    assert part.present == [0, 2]


def test_ragged_retire_leaves_caches_it_cannot_select_alone():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class Other(DynamicLayer):  # a layer with state of its own (as quantized layers have)
        pass

    model = make_tiny("llama")
    ids, mask = padded_batch(2, seed=4)
    cache = DynamicCache(config=model.config)
    cache.layers = [Other() for _ in cache.layers]
    kv = RaggedKV(model, cache, 0)
    kv.prefill(ids, mask)
    assert not kv.can_retire()
    kv.retire([1])
    assert kv.present is None and cache.layers[0].keys.shape[0] == 2


def test_aligned_rows_that_got_apart_take_one_token_steps_with_the_same_logits():
    """After rows keep different counts, the shorter rows' caches move right (no re-fed tokens): the
    next 1-token step is a window of width 1 for the batch, and each row's logits are the bits of
    the same tokens fed to that row alone (prompts fed as windows: a prefill may use other kernels).
    Everything runs under no_grad, as generate does: with autograd on the engine hands the forward to
    the module path, whose GEMMs are not row-invariant on every CPU (they differ on an AMD EPYC)."""
    from infertrix.engine import EngineCache

    model = make_tiny("llama")
    ix.optimize(model)  # the engine
    ids, mask = padded_batch(3, seed=5)
    prompts = [ids[r, mask[r].bool()].tolist()[:8] for r in range(3)]
    widths = []

    def fed(rows):
        kv = AlignedKV(model, EngineCache(model.config), 0)
        real = kv._forward

        def spy(ids, mask, positions, keep):
            widths.append(ids.shape[1])
            return real(ids, mask, positions, keep)

        kv._forward = spy
        kv.begin(len(rows), torch.device("cpu"))
        kv.extend(rows)
        return kv

    feeds = [[[5, 6, 7, 8, 9], [7], [8, 9, 10]], [[11], [12], [13]], [[14], [15], [16]]]
    kept = [5, 1, 2]  # of the fed tokens: row 0 gets 4 tokens ahead of row 1
    with torch.no_grad():
        kv = fed(prompts)
        kv.extend(feeds[0])
        kv.keep_fed(kept)
        widths.clear()
        steps = [kv.extend(f) for f in feeds[1:]]
        assert widths == [1, 1]  # one token per row: nothing re-fed
        for r in range(3):
            alone = fed([prompts[r] + feeds[0][r][: kept[r]]])
            for f, got in zip(feeds[1:], steps, strict=True):
                assert torch.equal(alone.extend([f[r]])[0], got[r]), r
    engine = ix.describe(model).transforms[0]["report"]
    assert engine["fallbacks"] == {} and engine["engine_forwards"] > 0, engine  # all ran on the engine


def test_quantized_self_on_a_quantized_target_says_drafting_cannot_pay():
    import warnings

    model = make_tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float target: no warning
        ix.optimize(model, "quantized_self")
    assert "warning" not in ix.describe(model).transforms[0]["report"]
    ix.restore(model)
    with pytest.warns(UserWarning, match="drafting cannot pay.*pld"):
        ix.optimize(model, "w4a8", "quantized_self")
    report = [t for t in ix.describe(model).transforms if t["name"] == "quantized_self"][0]["report"]
    assert "MiB of weights per token" in report["warning"]


def _spec_path(model, recipe, ids, mask):
    """(plain tokens, speculative tokens, stats, the draft path the call took)."""
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    ix.optimize(model, *recipe)
    try:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
        record = ix.speculative.speculative_stats(model)
        return ref, out, record.last, record.draft_path
    finally:
        ix.restore(model)


@pytest.mark.parametrize("engine", [True, False])
def test_quantized_self_drafts_on_the_models_own_cache(engine):
    """QSpec-style: the quantized copy drafts over the model's KV cache (no cache of its own, no
    catch-up over the prompt); its entries are cut before verification, so rows stay identical."""
    model = make_tiny("llama")
    ids, mask = padded_batch(3, seed=4)
    base = [] if engine else ["engine(enabled=false)"]
    ref, out, stats, path = _spec_path(model, [*base, QuantizedSelf(adaptive=False)], ids, mask)
    assert torch.equal(ref, out) and stats.drafted > 0 and stats.accepted > 0
    assert path == ("engine" if engine else "module") + ", on the model's KV cache"
    # its own cache on request, or under a KV policy (which must not see the draft's queries)
    for recipe, b in (([QuantizedSelf(adaptive=False, shared_cache=False)], 3),
                      (["snapkv:0.5", QuantizedSelf(adaptive=False)], 1)):
        ref, out, stats, path = _spec_path(model, [*base, *recipe], ids[:b], mask[:b])
        assert torch.equal(ref, out) and stats.drafted > 0
        assert "on the model's KV cache" not in path


@pytest.mark.parametrize("engine", [True, False])
def test_self_speculation_through_skipped_layers_at_batch_3(engine):
    """A skip plan drafts on the model's own cache on the engine (skipped layers' lengths restored
    after each draft), on its own engine draft cache with the engine off; rows moving apart there
    realign past the layer the plan never runs (it held no buffer: a crash before)."""
    model = make_tiny("llama", num_hidden_layers=4)
    ids, mask = padded_batch(3, seed=4)
    base = [] if engine else ["engine(enabled=false)"]
    ref, out, stats, path = _spec_path(
        model, [*base, SelfSpeculative(plan=UniformSkip(fraction=0.25), adaptive=False, confidence=0.0)], ids, mask)
    assert torch.equal(ref, out) and stats.drafted > 0 and stats.accepted > 0
    assert path.startswith("engine (skipping 2:layer)")
    assert path.endswith("on the model's KV cache") is engine
