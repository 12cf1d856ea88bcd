"""Policies that observe attention on the decode engine: H2O (every step) and decode_interval
compressions (SnapKV, TOVA...) score from the engine's attention probabilities and queries, with
the module path's scores to float32 rounding, the same kept slots and greedy tokens, bitwise the
same at 1 and 2 threads; what stays unsupported falls back with its reason."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_engine import build, tokens
from test_engine_kv import _counts, _reason, padded

import infertrix as ix
from infertrix.kvcache import new_cache
from infertrix.kvcache.attach import kv_setup

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
# evict on the tiny prompts; SnapKV's window mixes the prompt's buffered queries with decoded ones
OBSERVING = ["h2o:0.5", "h2o(compression=0.5,decode_interval=3)", "snapkv(compression=0.5,window_size=8,decode_interval=3)",
             "tova(compression=0.5,decode_interval=1)"]
SCORE_TOL = 2e-5  # max |engine - module| over the scores' max: float32 rounding of another summation order


def tiny(arch: str, policy: str, engine: bool):
    if arch == "qwen3":
        model = build("qwen3", engine=False)
    elif arch == "gemma3":  # full-attention layers only: a PolicyCache keeps stock sliding layers, the module path's
        model = make_tiny("gemma3", 0, layer_types=["full_attention"] * 2, num_hidden_layers=2)
    else:
        model = make_tiny(arch, 0)
    return ix.optimize(model, policy, *(["engine"] if engine else []))


def record_scores(model) -> list[torch.Tensor]:
    """Every score the policy computes from now on (H2O's accumulated attention at each step, a
    compression's scores), in order."""
    policy = kv_setup(model).policy
    seen: list[torch.Tensor] = []
    observe, score = policy.observe, policy.score

    def observing(ctx, new_queries):
        observe(ctx, new_queries)
        if "h2o" in ctx.state.aux:
            seen.append(ctx.state.aux["h2o"].clone())

    def scoring(ctx):
        out = score(ctx)
        seen.append(out.clone())
        return out

    policy.observe, policy.score = observing, scoring
    return seen


def generate(model, ids, mask, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)


def assert_scores_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) and got
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        finite = w.abs() < 1e29  # FORCE_KEEP marks the windows both keep
        assert torch.equal(finite, g.abs() < 1e29)
        scale = w[finite].abs().max()
        assert (g[finite] - w[finite]).abs().max() <= SCORE_TOL * scale, (g - w).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", OBSERVING)
def test_engine_scores_match_module_path(arch, policy):
    """A left-padded batch of two through generate: the prompt on the module path, every decoding
    step on the engine, whose scores (H2O's accumulated attention, SnapKV's and TOVA's compression
    scores) equal the module path's to float32 rounding; the kept slots and the tokens are the same."""
    ids, mask = padded([30, 23], seed=2)
    n = 8
    eng, mod = tiny(arch, policy, True), tiny(arch, policy, False)
    got, want = record_scores(eng), record_scores(mod)
    out_e, out_m = generate(eng, ids, mask, n), generate(mod, ids, mask, n)
    assert torch.equal(out_e, out_m)
    assert_scores_close(got, want)
    assert _counts(eng) == (n - 1, 1)  # only the prompt took the module path
    report = ix.describe(eng)
    assert "prefill chunk" in str(report) and "observes attention" not in str(report)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", ["h2o:0.5", "snapkv(compression=0.5,window_size=8,decode_interval=2)"])
def test_kept_slots_match_module_path(arch, policy):
    """Manual steps over a padded batch: after each decoding step the engine's cache keeps the same
    slots as the module path's (same stored keys to float32 rounding), H2O's scores the same."""
    ids, mask = padded([33, 26], seed=4)
    models = [tiny(arch, policy, True), tiny(arch, policy, False)]
    caches = [new_cache(m) for m in models]
    steps = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    for j in range(-1, 7):
        m_j = torch.cat([mask, torch.ones(2, j + 1, dtype=torch.long)], 1)
        x = ids if j < 0 else steps[:, j : j + 1]
        pos = (m_j.cumsum(-1) - 1).clamp_min(0)[:, -x.shape[1] :]
        with torch.no_grad():
            for m, c in zip(models, caches, strict=True):
                m(input_ids=x, attention_mask=m_j, position_ids=pos, cache=c, use_cache=True)
        for le, lm, se, sm in zip(caches[0].evicting_layers, caches[1].evicting_layers, caches[0].states,
                                  caches[1].states, strict=True):
            assert le.stored_length == lm.stored_length < le.cumulative_length
            torch.testing.assert_close(le.keys, lm.keys, rtol=1e-4, atol=1e-5)
            if "h2o" in sm.aux:
                torch.testing.assert_close(se.aux["h2o"], sm.aux["h2o"], rtol=SCORE_TOL, atol=SCORE_TOL)
    assert _counts(models[0]) == (7, 1)


@pytest.mark.parametrize("policy", ["h2o(compression=0.5,decode_interval=4)",
                                    "snapkv(compression=0.5,window_size=8,decode_interval=3)"])
def test_threads_give_identical_scores_and_tokens(policy):
    ids, mask = padded([30, 23], seed=6)
    threads = torch.get_num_threads()
    runs = []
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            model = tiny("llama", policy, True)
            seen = record_scores(model)
            runs.append((generate(model, ids, mask, 9), seen))
    finally:
        torch.set_num_threads(threads)
    (out1, s1), (out2, s2) = runs
    assert torch.equal(out1, out2)
    assert len(s1) == len(s2) and all(torch.equal(a, b) for a, b in zip(s1, s2, strict=True))


def test_batch_row_scores_equal_the_row_alone():
    """Prompts shorter than prefill_min_tokens run on the engine too: H2O's accumulated attention of
    a left-padded batch row has the same bits as the row alone's, prompt and steps."""
    ids, mask = padded([12, 9], seed=8)
    steps = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    accs = []
    for rows in ([0, 1], [1]):
        model = tiny("llama", "h2o:0.5", True)
        cache = new_cache(model)
        r_mask = mask[rows]
        cols = r_mask.sum(0) > 0  # the row alone: no pad columns
        r_ids, r_mask = ids[rows][:, cols], r_mask[:, cols]
        with torch.no_grad():
            model(input_ids=r_ids, attention_mask=r_mask, position_ids=(r_mask.cumsum(-1) - 1).clamp_min(0),
                  cache=cache, use_cache=True)
            for j in range(5):
                r_mask = torch.cat([r_mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
                model(input_ids=steps[rows, j : j + 1], attention_mask=r_mask, position_ids=r_mask.sum(-1, keepdim=True) - 1,
                      cache=cache, use_cache=True)
        assert _counts(model) == (6, 0)
        accs.append([s.aux["h2o"][-1] for s in cache.states])
    for batch_row, alone in zip(*accs, strict=True):
        assert torch.equal(batch_row[..., -alone.shape[-1] :], alone)
        assert not bool(batch_row[..., : -alone.shape[-1]].any())  # the pads receive nothing


def test_unsupported_observation_falls_back_and_says_why():
    """H2O over KIVI codes: the engine's KIVI step returns no attention, so those steps take the
    module path, with the reason in describe()."""
    model = ix.optimize(make_tiny("llama", 0), "h2o:0.5", "kivi(residual_length=8,group_size=8)", "engine")
    want = ix.optimize(make_tiny("llama", 0), "h2o:0.5", "kivi(residual_length=8,group_size=8)")
    ids = tokens(50, 4)
    mask = torch.ones_like(ids)
    assert torch.equal(generate(model, ids, mask, 5), generate(want, ids, mask, 5))
    _reason(model, "H2O scores layer 0's attention over KIVI codes", 4)

def test_long_observed_forward_falls_back_and_says_why():
    """A prompt below a large prefill_min_tokens but above 64 tokens: H2O would read a prompt x prompt
    matrix per layer from the engine, so it takes the module path (which scores in chunks)."""
    model = tiny("llama", "h2o(compression=0.5,prefill_min_tokens=200)", True)
    want = tiny("llama", "h2o(compression=0.5,prefill_min_tokens=200)", False)
    ids = tokens(70, 4)
    mask = torch.ones_like(ids)
    assert torch.equal(generate(model, ids, mask, 4), generate(want, ids, mask, 4))
    _reason(model, "a forward of 70 tokens whose attention H2O reads")
    assert _counts(model) == (3, 1)
