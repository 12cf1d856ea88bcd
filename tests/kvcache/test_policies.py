"""KV-cache policies under generate: identity at ratio 0, padding, GQA, cache reuse, chunked prefill, crop."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_decode_as_alone, kv_policies, left_padded, make_tiny
from transformers.cache_utils import DynamicSlidingWindowLayer

import infertrix as ix
from infertrix.core import ConfigError, ConflictError, UnsupportedModelError
from infertrix.kvcache import (
    D2O,
    H2O,
    KIVI,
    TOVA,
    CacheCropError,
    DensityKV,
    EvictingLayer,
    KNorm,
    PolicyCache,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    new_cache,
)
from infertrix.kvcache.cache import EVICTING_HEADROOM


def ids_of(seed: int, *lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, n), generator=g) for n in lengths]


def greedy(model, ids, **kw):
    out = model.generate(
        ids,
        max_new_tokens=kw.pop("max_new_tokens", 6),
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, 1)


RATIO_ZERO_CASES = [("llama", p) for p in kv_policies(compression=0.0)] + [
    (arch, p)
    for arch in ("qwen2", "mistral", "gemma3")
    for p in (SnapKV(window_size=4, compression=0.0), H2O(compression=0.0))
]


@pytest.mark.parametrize(
    ("arch", "policy"),
    RATIO_ZERO_CASES,
    ids=lambda p: p if isinstance(p, str) else type(p).__name__,
)
@pytest.mark.parametrize("engine", ["engine(enabled=false)", "engine"])
def test_ratio_zero_is_bit_identical(arch, policy, engine):
    """Against the same model without the policy, on each decode path (the engine is the default)."""
    model = make_tiny(arch)
    (ids,) = ids_of(0, 30)
    refs = {}
    for path in ("engine(enabled=false)", "engine"):
        ix.optimize(model, path)
        refs[path] = greedy(model, ids)
        ix.restore(model)
    ix.optimize(model, policy, engine)
    seq, logits = greedy(model, ids)
    if engine == "engine":  # Gemma 3's sliding layers stay stock cache layers: the module path, said so
        report = ix.describe(model).transforms[-1]["report"]
        assert (report["module_forwards"] > 0) == (arch == "gemma3"), report
        engine = "engine(enabled=false)" if arch == "gemma3" else engine
    ref_seq, ref_logits = refs[engine]
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)


# rows shorter than the budget keep all their tokens plus pads; PyramidKV's per-layer budgets reach 20
# tokens, so its rows are all longer than that (budgets follow the padded length, the same for all rows)
# DensityKV's layer budgets follow the batch's attention density, so a padded row is not its row alone
PADDED_CASES = [
    ("llama", p) for p in kv_policies(budget=12) if not isinstance(p, PyramidKV | DensityKV)
] + [
    ("llama", PyramidKV(window_size=4, kernel_size=3, beta=4, budget=12)),
    ("llama", SnapKV(window_size=4, budget=12, decode_interval=3)),
    ("gemma3", SnapKV(window_size=4, budget=12)),
    ("qwen2", H2O(budget=12)),
]


@pytest.mark.parametrize(
    ("arch", "policy"),
    PADDED_CASES,
    ids=lambda p: p if isinstance(p, str) else type(p).__name__ + f"{p.decode_interval or ''}",
)
def test_padded_batch_equals_rows_alone(arch, policy):
    model = make_tiny(arch)
    rows = ids_of(1, 30, 22, 26) if isinstance(policy, PyramidKV) else ids_of(1, 22, 9, 16)
    ix.optimize(model, policy)
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 5)


@pytest.mark.parametrize(
    "policy",
    [
        SnapKV(window_size=4, compression=0.5),
        H2O(compression=0.6),
        KNorm(budget=10, decode_interval=4),
        TOVA(budget=12, decode_interval=1),
        DensityKV(window_size=4, compression=0.5, decode_interval=3),
    ],
    ids=lambda p: type(p).__name__,
)
def test_generate_equals_manual_loop_with_positions(policy):
    model = make_tiny("qwen2")
    (ids,) = ids_of(2, 25)
    ix.optimize(model, policy)
    seq, logits = greedy(model, ids, max_new_tokens=10)
    cache = new_cache(model)
    n = ids.shape[1]
    out = model(ids, cache=cache, position_ids=torch.arange(n)[None])
    tokens, manual_logits = [], [out.logits[:, -1]]
    for step in range(9):
        tok = manual_logits[-1].argmax(-1, keepdim=True)
        tokens.append(tok)
        out = model(tok, cache=cache, position_ids=torch.tensor([[n + step]]))
        manual_logits.append(out.logits[:, -1])
    tokens.append(manual_logits[-1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, 1), seq[:, n:])
    torch.testing.assert_close(torch.stack(manual_logits, 1), logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == n + 9  # positions count every token, evicted or not
    stored = cache.layers[0].stored_length
    kv_len, offset = cache.get_mask_sizes(1, 0)
    assert (kv_len, offset) == (stored + 1, n + 9 - stored)


def manual_generate(model, cache, ids, new_tokens):
    """Greedy decoding the way generate feeds a reused cache: only tokens the cache has not seen."""
    seen = cache.get_seq_length()
    out = model(ids[:, seen:], cache=cache)
    toks = []
    for _ in range(new_tokens):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        if len(toks) < new_tokens:
            out = model(tok, cache=cache)
    return torch.cat([ids, *toks], 1)


@pytest.mark.parametrize(
    "policy",
    [
        SnapKV(window_size=4, compression=0.5),
        StreamingLLM(budget=16),
        DensityKV(window_size=4, compression=0.5),
        None,
    ],
    ids=lambda p: type(p).__name__,
)
def test_cache_reuse_across_two_generate_calls(policy):
    model = make_tiny("llama")
    ix.optimize(model, *([policy] if policy else [KIVI(bits=4, group_size=4, residual_length=4)]))
    first, more = ids_of(3, 20, 12)
    cache = new_cache(model)
    out1 = model.generate(first, cache=cache, max_new_tokens=5, do_sample=False)
    ids2 = torch.cat([out1, more], 1)
    out2 = model.generate(ids2, cache=cache, max_new_tokens=5, do_sample=False)
    assert cache.get_seq_length() == ids2.shape[1] + 4

    ref_cache = new_cache(model)
    r1 = manual_generate(model, ref_cache, first, 5)
    assert torch.equal(r1, out1)
    r2 = manual_generate(model, ref_cache, ids2, 5)
    assert torch.equal(r2, out2)
    assert ref_cache.stored_lengths() == cache.stored_lengths()


def test_chunked_prefill_keeps_positions_and_budget():
    model = make_tiny("mistral")
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    (ids,) = ids_of(4, 40)
    cache = new_cache(model)
    model(ids[:, :24], cache=cache)
    assert cache.get_seq_length() == 24 and cache.stored_lengths()[0] == 12
    out = model(ids[:, 24:], cache=cache)
    assert cache.get_seq_length() == 40 and cache.stored_lengths()[0] == 20
    assert out.logits.shape == (1, 16, 128) and torch.isfinite(out.logits).all()
    # ratio 0 chunked == one shot
    ix.restore(model)
    ix.optimize(model, SnapKV(window_size=4, compression=0.0))
    one = model(ids).logits
    cache = new_cache(model)
    parts = [
        model(ids[:, :24], cache=cache).logits,
        model(ids[:, 24:], cache=cache).logits,
    ]
    torch.testing.assert_close(torch.cat(parts, 1), one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_gqa_stores_per_kv_head_and_really_shrinks(kv_heads):
    model = make_tiny("llama", num_key_value_heads=kv_heads)
    ix.optimize(model, SnapKV(window_size=4, compression=0.75))
    (ids,) = ids_of(5, 64)
    cache = new_cache(model)
    model(ids, cache=cache)
    for layer in cache.layers:
        assert layer.keys.shape == (1, kv_heads, 16, 16)
        assert (
            layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
        )  # compact, not a view of the old
    assert cache.kv_bytes() == cache.full_kv_bytes() // 4
    rep = ix.describe(model).transforms[0]["report"]
    assert rep["kv_fraction"] == 0.25 and rep["tokens_seen"] == 64


def test_sliding_layers_left_alone_in_gemma3():
    model = make_tiny("gemma3", num_hidden_layers=4)
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    (ids,) = ids_of(6, 30)
    cache = new_cache(model)
    model(ids, cache=cache)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, EvictingLayer] * 2
    assert cache.layers[0].keys.shape[-2] == 7  # stock sliding window (8 - 1)
    assert cache.layers[1].keys.shape[-2] == 15  # compressed full-attention layer
    assert cache.get_seq_length() == 30


def test_decode_time_compression_bounds_the_cache():
    model = make_tiny("llama")
    ix.optimize(model, KNorm(budget=10, decode_interval=4))
    (ids,) = ids_of(7, 20)
    cache = new_cache(model)
    model.generate(ids, cache=cache, max_new_tokens=20, do_sample=False)
    assert cache.get_seq_length() == 39
    assert all(10 <= s < 14 for s in cache.stored_lengths())


def test_pyramid_budgets_differ_per_layer_and_average_to_the_budget():
    model = make_tiny("llama", num_hidden_layers=4)
    ix.optimize(model, PyramidKV(window_size=4, kernel_size=3, compression=0.5, beta=4))
    (ids,) = ids_of(8, 40)
    cache = new_cache(model)
    model(ids, cache=cache)
    lengths = cache.stored_lengths()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert sum(lengths) == 4 * 20


def test_pyramid_keeps_the_total_when_its_base_exceeds_the_prompt():
    """At low compression the pyramid's bottom layers would need more tokens than the prompt has:
    they keep the whole prompt and the excess goes up the pyramid, so KV bytes follow the budget."""
    policy = PyramidKV(window_size=4, compression=0.25, beta=20)
    budgets = [policy.layer_target(2048, r, 30) for r in range(30)]
    assert sum(budgets) == 30 * 1536
    assert max(budgets) == 2048 and budgets == sorted(budgets, reverse=True)


def test_merge_changes_kept_states_not_their_number():
    model = make_tiny("llama")
    (ids,) = ids_of(9, 30)
    caches = []
    for policy in (H2O(compression=0.5), D2O(compression=0.5, merge_threshold=-1.0)):
        ix.restore(model)
        ix.optimize(model, policy)
        cache = new_cache(model)
        model(ids, cache=cache)
        caches.append(cache)
    a, b = caches[0].layers[0], caches[1].layers[0]
    assert a.keys.shape == b.keys.shape
    assert not torch.equal(a.values, b.values)


def test_crop_rolls_back_exactly_when_tokens_are_stored():
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=8, compression=0.5))
    (ids,) = ids_of(10, 30)
    cache = new_cache(model)
    model(ids, cache=cache)
    draft = torch.tensor([[5, 6, 7]])
    first = model(draft, cache=cache).logits
    stored = cache.stored_lengths()
    cache.crop(-3)
    assert cache.get_seq_length() == 30 and cache.stored_lengths() == [s - 3 for s in stored]
    again = model(draft, cache=cache).logits
    assert torch.equal(first, again)

    ix.restore(model)
    ix.optimize(model, KNorm(compression=0.5))
    cache = new_cache(model)
    model(ids, cache=cache)
    with pytest.raises(CacheCropError, match="only the last .* tokens are still stored exactly"):
        cache.crop(-3)


def test_beam_search_runs_with_a_policy_cache():
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, budget=10))
    (ids,) = ids_of(11, 20)
    out = model.generate(ids, num_beams=2, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 24)


def test_recipes_and_conflicts():
    assert ix.parse_recipe("snapkv:0.5") == [SnapKV(compression=0.5)]
    assert ix.parse_recipe("kivi:2") == [KIVI(bits=2)]
    model = make_tiny("llama")
    ix.optimize(model, "kivi:4,h2o:0.25")  # quantization composes with a policy
    with pytest.raises(ConflictError, match="kv cache policy"):
        ix.optimize(model, "snapkv:0.5")


def test_restore_removes_every_hook():
    model = make_tiny("llama")
    ix.optimize(model, "snapkv:0.5(window_size=4),kivi:4")
    attn = model.model.layers[0].self_attn
    assert attn._forward_hooks and "generate" in model.__dict__
    ix.restore(model)
    assert (
        not attn._forward_hooks and not attn._forward_pre_hooks and "generate" not in model.__dict__
    )


def test_generate_gets_a_fresh_policy_cache_unless_given_one():
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    (ids,) = ids_of(12, 20)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, PolicyCache)
    out2 = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out2.cache is not out.cache


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match=r"compression must be in \[0, 1\)"):
        SnapKV(compression=bad)


def test_clear_errors():
    with pytest.raises(ConfigError, match="cannot hold the 32 tokens it always keeps"):
        SnapKV(window_size=32, budget=16)
    with pytest.raises(ConfigError, match="bits must be 2 or 4"):
        KIVI(bits=3)
    with pytest.raises(ConfigError, match="kernel_size must be odd"):
        SnapKV(kernel_size=4)
    with pytest.raises(ConfigError, match="budget must be a positive token count"):
        KNorm(budget=0)
    with pytest.raises(UnsupportedModelError, match="no infertrix.kvcache transform"):
        new_cache(make_tiny("llama"))
    flex = make_tiny("llama")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation 'sdpa' or 'eager'"):
        ix.optimize(flex, "snapkv:0.5")


def test_right_padding_is_a_clear_error():
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, budget=8))
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with pytest.raises(ConfigError, match="needs left padding"):
        model(ids, attention_mask=mask, cache=new_cache(model))


def merge_all_pairs(keys, values, keep, visible, threshold):
    """D2O merging as first written: similarities of all S stored tokens to the K kept ones."""
    b, h, s, d = keys.shape
    evicted = torch.ones(b, h, s, dtype=torch.bool)
    evicted.scatter_(-1, keep, False)
    if visible is not None:
        evicted &= visible[:, None, :]
    kf, vf = keys.float(), values.float()
    kn = torch.nn.functional.normalize(kf, dim=-1)
    kept_n = torch.gather(kn, 2, keep.unsqueeze(-1).expand(-1, -1, -1, d))
    best_sim, best = torch.matmul(kn, kept_n.transpose(-1, -2)).max(dim=-1)
    weight = torch.where(evicted & (best_sim >= threshold), best_sim, torch.zeros_like(best_sim))
    slot = torch.gather(keep, -1, best)
    num_k, num_v = kf.clone(), vf.clone()
    num_k.scatter_add_(2, slot.unsqueeze(-1).expand(-1, -1, -1, d), kf * weight.unsqueeze(-1))
    num_v.scatter_add_(2, slot.unsqueeze(-1).expand(-1, -1, -1, d), vf * weight.unsqueeze(-1))
    den = torch.ones(b, h, s).scatter_add_(2, slot, weight)
    return num_k / den.unsqueeze(-1), num_v / den.unsqueeze(-1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3])
def test_merge_of_evicted_tokens_only_equals_all_pairs(seed, threshold):
    """merge_evicted scores only the evicted tokens against the kept ones: same result as scoring
    every stored token (kept tokens and pads never merge), on random shapes, budgets and padding."""
    from infertrix.kvcache.merge import merge_evicted

    g = torch.Generator().manual_seed(seed)
    b, h, s, d = 2, 3, int(torch.randint(5, 70, (1,), generator=g)), 16
    k = int(torch.randint(1, s, (1,), generator=g))
    keys, values = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d, generator=g)
    keep = torch.stack([torch.randperm(s, generator=g)[:k].sort().values for _ in range(b * h)])
    keep = keep.view(b, h, k)
    visible = None
    if seed % 2:
        visible = torch.ones(b, s, dtype=torch.bool)
        visible[1, : s // 3] = False
    got = merge_evicted(keys, values, keep, visible, threshold)
    want = merge_all_pairs(keys, values, keep, visible, threshold)
    for a, w in zip(got, want, strict=True):  # to rounding: the [E, K] product is another matmul
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-6)


def test_policy_layers_append_in_place():
    """Decoding writes each token into the layer's buffer (no copy of the cache per step); the
    compression after the prompt stores new tensors, re-buffered once by the next step."""
    model = make_tiny("llama")
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    cache = new_cache(model)
    model(torch.randint(3, 128, (2, 40)), cache=cache)
    layer = cache.layers[0]
    assert layer.kbuf is None and layer.keys.shape[-2] == 20
    ptrs = set()
    for _ in range(20):
        model(torch.randint(3, 128, (2, 1)), cache=cache)
        ptrs.add(layer.keys.data_ptr())
    # one buffer for the prompt, one after the eviction, then in place
    assert len(ptrs) == 1 and layer.reallocations == 2
    assert layer.keys.shape[-2] == 40 and layer.kbuf.shape[-2] == 21 + EVICTING_HEADROOM
