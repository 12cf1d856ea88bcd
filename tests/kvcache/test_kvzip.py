"""KVzip: each stored token scores the most attention the model pays it while re-reading the prompt
(repeat prompt + the prompt, teacher-forced, in chunks), checked against transformers' own eager
attention probabilities; a padded batch of 4 decodes as its rows alone; replay builds the same cache."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_decode_as_alone, byte_tokenizer, left_padded, make_tiny
from transformers import DynamicCache

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import KIVI, KVzip, new_cache
from infertrix.kvcache.kvzip import (
    CONTINUE_PROMPT,
    OVERLAP_TOKENS,
    REPEAT_PROMPT,
    reconstruction_scores,
)
from infertrix.kvcache.replay import record_prefill, replay

VOCAB = 259  # the byte tokenizer's: the repeat prompt is real text


def tiny(arch: str = "llama"):
    return make_tiny(arch, vocab_size=VOCAB)


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_scores_are_each_chunk_keys_largest_probability_over_the_group_and_the_input():
    g = torch.Generator().manual_seed(0)
    hkv, groups, skip, context, n, d = 2, 3, 2, 5, 4, 8
    queries = torch.randn(hkv * groups, n, d, generator=g)
    keys = torch.randn(hkv, skip + context + n, d, generator=g)
    got = reconstruction_scores(queries, keys, skip, context, 0.5)
    want = torch.zeros(hkv, context)
    for h in range(hkv):
        for j in range(groups):
            for i in range(n):  # query i sees the sinks, the chunk and the input up to itself
                seen = keys[h, : skip + context + i + 1]
                p = torch.softmax(seen @ queries[h * groups + j, i] * 0.5, dim=0)[skip : skip + context]
                want[h] = torch.maximum(want[h], p)
    torch.testing.assert_close(got, want)


def reference_scores(model, ids: torch.Tensor, chunk: int, sinks: int) -> list[torch.Tensor]:
    """[B=1, H_kv, S] per layer, from transformers' eager attention: the prompt prefilled into a
    DynamicCache, then each chunk's repeat input fed on a copy; the paper's softmax over the sinks,
    the chunk and the input is the full softmax renormalized over those keys."""
    tok = byte_tokenizer()
    enc = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in (REPEAT_PROMPT, *CONTINUE_PROMPT)]
    model.set_attn_implementation("eager")
    s = ids.shape[1]
    base = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=base)
    cfg = model.config
    hkv, groups = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    scores = [torch.zeros(1, hkv, s) for _ in range(cfg.num_hidden_layers)]
    for start in range(0, s, chunk):
        part = ids[0, start : start + chunk]
        if start == 0:
            head = [enc[0]]
        else:
            head = [enc[1], ids[0, max(0, start - OVERLAP_TOKENS) : start], enc[2]]
        recon = torch.cat([*head, part])[None]
        cache = DynamicCache(config=cfg)
        for layer, src in zip(cache.layers, base.layers, strict=True):
            layer.update(src.keys.clone(), src.values.clone())
        with torch.no_grad():
            att = model(recon, cache=cache, output_attentions=True).attentions
        n = recon.shape[1]
        keep = torch.zeros(s + n, dtype=torch.bool)
        keep[: min(sinks, start)] = True
        keep[start : start + len(part)] = True
        keep[s:] = True
        for i, a in enumerate(att):  # [1, H_q, n, s + n]
            p = a * keep
            p = p / p.sum(-1, keepdim=True)
            p = p[..., start : start + len(part)].unflatten(1, (hkv, groups))
            scores[i][..., start : start + len(part)] = p.amax(dim=(2, 3))
    model.set_attn_implementation("sdpa")
    return scores


@pytest.mark.parametrize("chunk", [2048, 8], ids=["one chunk", "chunks of 8"])
def test_scores_are_the_reconstructions_attention_and_the_best_are_kept(chunk):
    model = tiny()
    ids = prompt(0, 30)
    want = reference_scores(model, ids, chunk, sinks=2)
    tok = byte_tokenizer()
    # a budget above the prompt: scored (the scores stay in the layer's state) but nothing evicted
    ix.optimize(model, KVzip(budget=40, chunk_size=chunk, sink_tokens=2, tokenizer=tok))
    full = new_cache(model)
    with torch.no_grad():
        model(ids, cache=full)
    for state, w in zip(full.states, want, strict=True):
        torch.testing.assert_close(state.aux["kvzip"], w, atol=1e-5, rtol=1e-4)
    # the cache is the prefill's: the reconstruction's tokens were cropped off again
    assert full.get_seq_length() == 30 and full.stored_lengths() == [30] * 4

    ix.restore(model)
    ix.optimize(model, KVzip(budget=12, chunk_size=chunk, sink_tokens=2, tokenizer=tok))
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, cache=cache)
    for layer, src, w in zip(cache.layers, full.layers, want, strict=True):
        score = w.clone()
        score[..., :2] += 1e30  # the sinks
        index = score.topk(12, dim=-1).indices.sort(dim=-1).values
        kept = torch.gather(src.keys, 2, index[..., None].expand(-1, -1, -1, src.keys.shape[-1]))
        assert torch.equal(layer.keys, kept)


def padded_batch(seed: int, *lengths: int):
    rows = [prompt(seed + i, n) for i, n in enumerate(lengths)]
    return *left_padded(rows), rows


@pytest.mark.parametrize("chunk", [2048, 8], ids=["one chunk", "chunks of 8"])
def test_left_padded_batch_of_four_decodes_as_its_rows_alone(chunk):
    model = tiny()
    ix.optimize(model, KVzip(budget=12, sink_tokens=2, chunk_size=chunk, tokenizer=byte_tokenizer()))
    batch, mask, rows = padded_batch(4, 28, 17, 22, 19)
    assert_rows_decode_as_alone(model, batch, mask, rows, 8)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_replay_equals_real_prefill(arch):
    """The path the RULER benchmark takes (record_prefill + replay), with padding and KIVI; Gemma 3's
    sliding-window layers are restored after the reconstruction."""
    model = tiny(arch)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    policy = KVzip(compression=0.5, sink_tokens=2, chunk_size=16, tokenizer=byte_tokenizer())
    quant = KIVI(bits=4, group_size=4, residual_length=4)
    ix.optimize(model, policy, quant)
    real = new_cache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=real)
    cache = replay(model, record_prefill(model, ids, mask), policy, quant)
    assert cache.stored_lengths() == real.stored_lengths() == [15] * len(real.stored_lengths())
    for a, b in zip(cache.layers, real.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    nxt = torch.tensor([[5], [6]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        assert torch.equal(model(nxt, attention_mask=mask2, cache=real).logits,
                           model(nxt, attention_mask=mask2, cache=cache).logits)


def test_each_chunk_costs_one_more_decoder_forward_and_describe_says_so():
    model = tiny()
    ix.optimize(model, KVzip(compression=0.5, sink_tokens=2, chunk_size=16, tokenizer=byte_tokenizer()))
    calls = []
    model.model.register_forward_hook(lambda m, a, out: calls.append(1))
    model.generate(prompt(1, 40), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 1 + 3 + 2  # the prefill, 40 tokens re-read in 3 chunks of 16, 2 decoding steps
    report = ix.describe(model).transforms[0]["report"]
    assert "second forward over each compressed prompt" in report["reconstruction"]
    assert "second forward" in KVzip.use_when
    assert report["tokens_stored"] == 20 + 2  # after the prefill's compression, plus the decoded tokens


def test_without_a_tokenizer_the_prompt_is_reread_alone_and_describe_says_so():
    model = make_tiny("llama")  # built from a config: no tokenizer to find
    ix.optimize(model, "kvzip:0.5(sink_tokens=2)")
    out = model.generate(prompt(2, 30), max_new_tokens=2, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths() == [15 + 1] * 4
    assert "no tokenizer" in ix.describe(model).transforms[0]["report"]["reconstruction"]


def test_decoded_tokens_are_reread_every_decode_interval_and_the_cache_stays_in_its_budget():
    model = tiny()
    ix.optimize(model, KVzip(budget=12, sink_tokens=2, decode_interval=4, tokenizer=byte_tokenizer()))
    out = model.generate(prompt(5, 30), max_new_tokens=13, min_new_tokens=13, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    # 12 decoded tokens were fed (the last is not): three re-reads, each back to 12, then none pending
    assert cache.stored_lengths() == [12] * 4
    for st in cache.states:
        assert bool((st.aux["kvzip_scored"] > 0).all())  # every kept token scored, decoded ones too
    assert "every 4 decoded tokens re-read" in ix.describe(model).transforms[0]["report"]["reconstruction"]
    ix.restore(model)
    ix.optimize(model, KVzip(budget=12, sink_tokens=2, tokenizer=byte_tokenizer()))
    out = model.generate(prompt(5, 30), max_new_tokens=13, min_new_tokens=13, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths() == [12 + 12] * 4  # without it, decoded tokens are kept


def test_a_decode_reread_equals_compressing_those_tokens_fed_as_one_chunk():
    """Four tokens fed one at a time with decode_interval=4 are re-read as the chunk a 4-token forward
    (prefill_min_tokens=4) would be: the same tokens kept, the same states to float rounding."""
    model, ids, extra = tiny(), prompt(6, 30), prompt(7, 4)
    caches = []
    for interval, steps in ((4, 4), (0, 1)):  # four 1-token forwards, or one 4-token chunk
        ix.restore(model)
        ix.optimize(model, KVzip(budget=12, sink_tokens=2, decode_interval=interval, prefill_min_tokens=4,
                                 tokenizer=byte_tokenizer()))
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, cache=cache)
            for j in range(0, 4, 4 // steps):
                part = extra[:, j : j + 4 // steps]
                model(part, cache=cache, position_ids=torch.arange(30 + j, 30 + j + part.shape[1])[None])
        caches.append(cache)
    a, b = caches
    assert a.stored_lengths() == b.stored_lengths() == [12] * 4
    for la, lb in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-5)


def test_a_padded_batch_decodes_as_its_rows_alone_with_decode_interval():
    model = tiny()
    ix.optimize(model, KVzip(budget=12, sink_tokens=2, decode_interval=3, tokenizer=byte_tokenizer()))
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in (28, 17, 22, 19)]
    assert_rows_decode_as_alone(model, *left_padded(rows), rows, 8)


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="chunk_size"):
        KVzip(chunk_size=0)
