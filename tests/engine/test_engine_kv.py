"""The engine on the KV-cache transforms' storage: decode steps and verification windows run on the
policies' (evicted) caches, prompt lookup stays token-identical with a policy, and every case the
engine leaves to the module path is reported."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from test_engine import _generate, build, tokens

import infertrix as ix
from infertrix.engine import engine_runtime
from infertrix.kvcache import EvictingLayer, new_cache

# evicts on the tiny tests' prompts (the default window of 32 would keep them whole)
SNAP = "snapkv(compression=0.5,window_size=8)"
POLICIES = [SNAP, "streaming_llm:0.5", "knorm:0.5", "pyramidkv(compression=0.5,window_size=8)"]


def with_policy(arch: str, kind: str, policy: str, *extra: str, engine: bool = True, seed: int = 0):
    model = make_tiny(arch, seed) if arch != "qwen3" else build("qwen3", engine=False, seed=seed)
    recipe = {"fp32": [], "w8a8": ["w8a8(smooth_alpha=none)"], "w4a8": ["w4a8"]}[kind]
    ix.optimize(model, *recipe, policy, *extra, *(["engine"] if engine else []))
    return model


def padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = tokens(n, seed + i)[0]
        mask[i, width - n :] = 1
    return ids, mask


def run(model, ids, mask, cache):
    """A forward with generate's position ids (counted from each row's first token)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits


def _counts(model) -> tuple[int, int]:
    report = engine_runtime(model).report()
    return report["engine_forwards"], report["module_forwards"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_decode_steps_on_evicted_cache_match_module_path(arch, policy):
    """A padded batch, prefilled (and evicted) on the module path, then decoded on the engine over
    the policy's storage: the same logits as the module path to float32 rounding."""
    ids, mask = padded([40, 33, 26], seed=5)
    models = [with_policy(arch, "fp32", policy), with_policy(arch, "fp32", policy, engine=False)]
    caches = [new_cache(m) for m in models]
    for m, c in zip(models, caches, strict=True):
        run(m, ids, mask, c)
    layer = caches[0].layers[0]
    assert isinstance(layer, EvictingLayer) and layer.stored_length < layer.cumulative_length
    steps = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    for j in range(6):
        m_j = torch.cat([mask, torch.ones(3, j + 1, dtype=torch.long)], 1)
        got, want = (run(m, steps[:, j : j + 1], m_j, c) for m, c in zip(models, caches, strict=True))
        assert (got - want).abs().max() <= 1e-5 * want.std(), (j, (got - want).abs().max())
    assert _counts(models[0]) == (6, 1)
    assert [ly.stored_length for ly in caches[0].evicting_layers] == [ly.stored_length for ly in caches[1].evicting_layers]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_windows_and_threads_are_bitwise_on_evicted_cache(arch):
    """After the policy's prefill, every token's logits are the same bits in 1-token steps, in
    verification windows of 2..8 tokens, as a row of a padded batch's cache, and at 1 or 2 threads."""
    model = with_policy(arch, "w4a8", SNAP)
    ids, mask = padded([45, 38], seed=7)
    base = new_cache(model)
    run(model, ids, mask, base)
    assert base.layers[0].stored_length < base.layers[0].cumulative_length
    nxt = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    threads = torch.get_num_threads()
    try:
        outs = []
        for th in (1, 2):
            torch.set_num_threads(th)
            for width in range(1, 9):
                cache = copy.deepcopy(base)
                parts = [run(model, nxt[:, s : s + width], full_mask[:, : ids.shape[1] + s + width], cache)
                         for s in range(0, 8, width)]
                outs.append(torch.cat(parts, 1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert _counts(model)[1] == 0  # the prefill too runs on the engine (quantized projections)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
def test_prompt_lookup_with_policy_is_token_identical(arch, kind):
    """`w4a8,snapkv,pld` equals `w4a8,snapkv` (engine in both): verification windows and 1-token
    steps compute the same logits over the same evicted cache."""
    ids = torch.cat([tokens(12, 3)] * 4, 1)
    plain = with_policy(arch, kind, SNAP)
    want = _generate(plain, ids, n=32)
    spec = with_policy(arch, kind, SNAP, "pld")
    got = _generate(spec, ids, n=32)
    assert torch.equal(got, want)
    assert _counts(plain)[1] == 0 and _counts(spec)[1] == 0  # the prefill too (quantized projections)
    report = ix.describe(spec).to_dict()["transforms"]
    assert any(t["report"].get("tokens_stored") for t in report if "tokens_stored" in t["report"])


def test_growing_cache_runs_on_engine_bitwise():
    """growing_kv's cache takes the engine for every forward, prefill included, with the same bits."""
    ids = tokens(30, 1)
    want = _generate(build("llama", "w4a8"), ids, n=12)
    model = build("llama", "w4a8", engine=False)
    ix.restore(model)
    ix.optimize(model, "w4a8", "growing_kv", "engine")
    assert torch.equal(_generate(model, ids, n=12), want)
    assert _counts(model) == (12, 0)


@pytest.mark.parametrize("extra", [[], [SNAP]])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_steps_on_engine_match_module_path(bits, extra):
    """One-token steps over KIVI codes run on the engine (kivi_decode_attention) with the module
    path's logits to float32 rounding, alone or after a policy's eviction, at 1 and 2 threads alike."""
    kivi = f"kivi(bits={bits},residual_length=8,group_size=8)"
    ids, mask = padded([40, 33, 26], seed=5)
    models = [with_policy("llama", "fp32", kivi, *extra), with_policy("llama", "fp32", kivi, *extra, engine=False)]
    steps = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    threads, outs = torch.get_num_threads(), []
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            caches = [new_cache(m) for m in models]
            for m, c in zip(models, caches, strict=True):
                run(m, ids, mask, c)
            for j in range(12):
                m_j = torch.cat([mask, torch.ones(3, j + 1, dtype=torch.long)], 1)
                got, want = (run(m, steps[:, j : j + 1], m_j, c) for m, c in zip(models, caches, strict=True))
                assert caches[0].layers[0].n_quantized == caches[1].layers[0].n_quantized > 0
                assert (got - want).abs().max() <= 1e-5 * want.std(), (j, (got - want).abs().max())
                outs.append(got)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(outs[:12], outs[12:], strict=True))
    assert _counts(models[0]) == ((26, 0) if not extra else (24, 2))


def _reason(model, why: str, at_least: int = 1) -> None:
    report = engine_runtime(model).report()
    hits = sum(v for k, v in report["fallbacks"].items() if why in k)
    assert hits >= at_least, report
    assert why in str(ix.describe(model))


def test_fallbacks_with_policies_run_the_module_path_and_say_why():
    ids = tokens(50, 4)
    h2o = with_policy("llama", "fp32", "h2o:0.5")
    want = _generate(with_policy("llama", "fp32", "h2o:0.5", engine=False), ids, n=6)
    assert torch.equal(_generate(h2o, ids, n=6), want)
    _reason(h2o, "a prefill chunk of 50 tokens on a PolicyCache (H2O")
    assert _counts(h2o) == (5, 1)  # H2O's steps observe the engine's attention (test_engine_observe.py)

    tova = with_policy("llama", "fp32", "tova(compression=0.5,decode_interval=4)")
    _generate(tova, ids, n=9)
    _reason(tova, "a prefill chunk of 50 tokens on a PolicyCache (TOVA")
    assert _counts(tova) == (8, 1)  # its decode-time compressions score from the engine's attention too

    kivi = with_policy("llama", "fp32", "kivi(residual_length=8,group_size=8)")
    cache = new_cache(kivi)
    run(kivi, ids, torch.ones_like(ids), cache)
    run(kivi, ids[:, :3], torch.ones(1, 53, dtype=torch.long), cache)
    _reason(kivi, "a window of 3 tokens over layer 0's KIVI codes")

    sliding = make_tiny("qwen2", 0, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    ix.optimize(sliding, "growing_kv", "engine")
    _generate(sliding, ids, n=3)
    _reason(sliding, "is a DynamicSlidingWindowLayer", 3)

    plain = build("llama")
    with torch.no_grad():
        plain(input_ids=ids, cache=__import__("transformers").DynamicCache(config=plain.config), use_cache=True)
    _reason(plain, "the cache is a DynamicCache")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
@pytest.mark.parametrize("policy", [SNAP, "h2o:0.5", "densitykv(compression=0.5,window_size=8)", "knorm:0.5",
                                    "adakv(compression=0.5,window_size=8,decode_interval=3)"])
def test_quantized_prefill_with_a_policy_runs_on_the_engine_and_rows_decode_as_alone(arch, kind, policy):
    """With quantized projections a policy's prompt chunks run on the engine too (the module path's
    prefill would round differently per batch and flip int8 codes): every row of a padded batch then
    decodes the tokens and the logits, bit for bit, of the row alone."""
    model = with_policy(arch, kind, policy)
    lengths = [40, 23, 31]
    ids, mask = padded(lengths, seed=9)

    def greedy(x, m):
        out = model.generate(x, attention_mask=m, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        return out.sequences[:, x.shape[1] :], torch.stack(out.logits, 1)

    seq, logits = greedy(ids, mask)
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0, report["fallbacks"]  # AdaKV's per-head masks too
    for i, n in enumerate(lengths):
        row = ids[i : i + 1, -n:]
        alone_seq, alone_logits = greedy(row, torch.ones_like(row))
        assert torch.equal(seq[i], alone_seq[0]), i
        assert torch.equal(logits[i], alone_logits[0]), (i, (logits[i] - alone_logits[0]).abs().max())


def test_a_quantized_prompt_is_compressed_layer_by_layer_on_the_engine(monkeypatch):
    """The engine hands each layer to the policy as soon as it has run (as the module path's hooks do),
    so the whole prompt's KV and queries are never held at once."""
    from infertrix.kvcache import PolicyCache

    model = with_policy("llama", "w4a8", "h2o:0.5")
    seen = []
    real = PolicyCache.after_engine_layer

    def spy(self, i, *args, **kw):
        seen.append([ly.stored_length for ly in self.evicting_layers])  # before layer i compresses
        return real(self, i, *args, **kw)

    monkeypatch.setattr(PolicyCache, "after_engine_layer", spy)
    ids = tokens(40, 3)
    cache = new_cache(model)
    run(model, ids, torch.ones_like(ids), cache)
    assert _counts(model) == (1, 0)
    assert seen[0] == [40, 0, 0, 0] and seen[1] == [20, 40, 0, 0]  # layer 1 runs after layer 0 was compressed


def test_a_second_prompt_chunk_over_fillers_on_the_engine_matches_each_row_alone():
    """A padded pair prefilled with W4A8 (rows keep their own budgets: the shorter one gets lead
    fillers), then a second 20-token chunk for both rows on the engine: each row's logits are the bits
    of the same two chunks run alone."""
    model = with_policy("llama", "w4a8", SNAP)
    ids, mask = padded([40, 23], seed=11)
    more = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(12))
    cache = new_cache(model)
    run(model, ids, mask, cache)
    assert cache.evicting_layers[0].lead is not None
    both = run(model, more, torch.cat([mask, torch.ones_like(more)], 1), cache)
    for i, n in enumerate([40, 23]):
        alone = new_cache(model)
        row = ids[i : i + 1, -n:]
        run(model, row, torch.ones_like(row), alone)
        want = run(model, more[i : i + 1], torch.ones(1, n + 20, dtype=torch.long), alone)
        assert torch.equal(both[i], want[0]), i
    assert _counts(model)[1] == 0


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["fp32", "w4a8"])
def test_kivi_layer_kernel_equals_its_reference(bits, kind, isa):
    """The C++ engine_kivi_layer is its reference's sequence of ops, bit for bit, on a real layer's
    KIVI codes and residual, padded rows masked (opcheck included), on every ISA path."""
    from infertrix import ops
    from infertrix.engine.kivi import _mask
    from infertrix.ops import engine as E

    assert ops.status()["engine_kivi_layer"]["cpu"].startswith("c++")  # (the isa fixture skips without it)
    model = with_policy("llama", kind, f"kivi(bits={bits},residual_length=8,group_size=8)")
    ids, mask = padded([40, 33], seed=9)
    cache = new_cache(model)
    run(model, ids, mask, cache)
    runner = engine_runtime(model).runner
    layer, lp = cache.layers[0], runner.layers[0]
    assert layer.n_quantized > 0
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 64, generator=g)
    a = E.rms_norm(h, lp.in_norm, lp.in_eps)
    empty = torch.empty(2, lp.ints[1], 0, lp.ints[2])
    index = layer.reserve(1, empty, empty)
    layer.commit(1)
    codes = [*layer.codes.keys, *layer.codes.values]
    pos = torch.tensor([[40], [33]])
    cos, sin = runner.tables[lp.rope]
    args = (lp.tensors, lp.ints, lp.floats)
    pads = (mask == 0).sum(-1)
    masked = _mask(layer, pads)
    assert masked is not None and torch.isinf(masked).any()  # row 1's pads hidden
    rest = (layer.keys.shape[2], codes, masked, bits, cos, sin, pos, index, 2)
    kc, vc = layer.kbuf.clone(), layer.vbuf.clone()
    got = E.engine_kivi_layer(h, a, *args, kc, vc, *rest)
    kr, vr = layer.kbuf.clone(), layer.vbuf.clone()
    want = E.engine_kivi_layer_reference(h, a, *args, kr, vr, *rest)
    # bitwise over the whole buffers (their spare capacity is uninitialised memory, whose NaN
    # patterns torch.equal would call unequal)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    assert all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in ((kc, kr), (vc, vr)))
    _, k, v = E._queries_keys_values(a, *args, cos, sin, pos, 2)
    for buf, new, orig in ((kc, k, layer.kbuf), (vc, v, layer.vbuf)):  # the new token's slot written, no other
        assert torch.equal(buf[:, :, index], new[:, 0])
        assert torch.equal(buf[:, :, :index].view(torch.int32), orig[:, :, :index].view(torch.int32))
    if kind == "fp32":
        torch.library.opcheck(E.engine_kivi_layer, (h, a, *args, kc, vc, *rest))
