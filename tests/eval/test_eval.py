"""infertrix.eval metrics on inputs whose answer is known."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import make_tiny
from transformers import DynamicCache

from infertrix import eval as ixe
from infertrix.eval import speed as speed_mod


@pytest.fixture
def byte_model():
    return make_tiny("llama", vocab_size=259)


def test_load_text_is_the_shipped_novel():
    text = ixe.load_text()
    assert text.startswith("PRIDE AND PREJUDICE") and len(text) > 600_000
    with pytest.raises(ValueError, match="shipped texts"):
        ixe.load_text("nope")


def test_perplexity_of_uniform_model_is_vocab_size(byte_model, byte_tok):
    torch.nn.init.zeros_(byte_model.lm_head.weight)  # every logit 0: uniform over the vocabulary
    ppl = ixe.perplexity(byte_model, byte_tok, max_tokens=300, window=100)
    assert ppl == pytest.approx(259, rel=1e-5)


def test_perplexity_matches_manual_nll(byte_model, byte_tok):
    text = "It is a truth universally acknowledged, that a single man " * 10
    windows = ixe.token_windows(byte_tok, text, max_tokens=200, window=64)
    assert windows.shape == (3, 64)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(byte_model(w[None]).logits[0, :-1].float(), -1)
            nll -= logp.gather(-1, w[1:, None]).sum().item()
            n += 63
    got = ixe.perplexity(byte_model, byte_tok, text=text, max_tokens=200, window=64, batch_size=2)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        ixe.perplexity(byte_model, byte_tok, text="short", window=64)


def test_token_agreement_known_values():
    assert ixe.token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert ixe.token_agreement([[1, 9, 3, 9], [5]], [[1, 2, 3, 4], [5, 6]]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        ixe.token_agreement([[1]], [])


def test_greedy_tokens_equal_manual_argmax_loop(byte_model, byte_tok):
    prompt = "Once upon"
    (got,) = ixe.greedy_tokens(byte_model, byte_tok, [prompt], max_new_tokens=6)
    ids = byte_tok(prompt, return_tensors="pt").input_ids
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = byte_model(ids).logits[0, -1].argmax().item()
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want
    assert ixe.greedy_agreement(byte_model, byte_tok, [prompt], [want], max_new_tokens=6) == 1.0


def test_next_token_agreement_is_teacher_forced(byte_model, byte_tok):
    prompt = "Once upon"
    torch.manual_seed(3)
    reference = torch.randint(3, 259, (8,)).tolist()  # a continuation the model would not choose
    ids = byte_tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():  # the model's argmax at each position, fed the reference prefix
        logits = byte_model(torch.cat([ids, torch.tensor([reference])], 1)).logits[0]
    choices = logits[ids.shape[1] - 1 : -1].argmax(-1).tolist()
    want = sum(a == b for a, b in zip(choices, reference, strict=True)) / len(reference)
    assert ixe.next_token_agreement(byte_model, byte_tok, [prompt], [reference]) == pytest.approx(want)
    # against its own greedy output the model agrees everywhere; with one early change, still on the
    # positions after it whose choice does not change, unlike position-wise agreement
    (own,) = ixe.greedy_tokens(byte_model, byte_tok, [prompt], max_new_tokens=8)
    assert ixe.next_token_agreement(byte_model, byte_tok, [prompt], [own]) == 1.0
    forced = [choices[0] if choices[0] != own[0] else (own[0] + 1) % 259, *own[1:]]
    assert ixe.next_token_agreement(byte_model, byte_tok, [prompt], [forced]) <= 7 / 8


def test_passkey_prompt_places_needle_at_depth(byte_tok):
    for depth in (0.0, 0.5, 1.0):
        p = ixe.passkey_prompt(byte_tok, 2000, depth, 12345)
        n = len(byte_tok(p).input_ids)
        assert 1900 <= n <= 2010, n
        pos = p.index("The pass key is 12345") / len(p)
        assert abs(pos - depth * (1 - 60 / len(p))) < 0.06
        assert p.endswith("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="depth"):
        ixe.passkey_prompt(byte_tok, 2000, 1.5, 1)


class _OracleModel(torch.nn.Module):
    """Answers the passkey by reading it from the prompt (or, if ``wrong``, a fixed wrong number)."""

    def __init__(self, tok, wrong=False):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.wrong = tok, wrong

    def generate(self, input_ids, **kw):
        import re

        text = self.tok.decode(input_ids[0])
        key = "00000" if self.wrong else re.search(r"pass key is (\d+)", text).group(1)
        ans = self.tok(f" {key}.", add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, ans], 1)


def test_passkey_accuracy_scores_answers(byte_tok):
    acc, det = ixe.passkey_accuracy(_OracleModel(byte_tok), byte_tok, context_tokens=600, trials=6, return_details=True)
    assert acc == 1.0 and len(det) == 6 and len({d["key"] for d in det}) == 6
    assert ixe.passkey_accuracy(_OracleModel(byte_tok, wrong=True), byte_tok, context_tokens=600, trials=4) == 0.0


def test_measure_speed_arithmetic_with_fake_clock(monkeypatch, byte_tok):
    clock = [0.0]
    monkeypatch.setattr(speed_mod.time, "perf_counter", lambda: clock[0])

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.calls = []

        def generate(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, **kw):
            assert min_new_tokens == max_new_tokens  # EOS suppressed: exactly n tokens
            self.calls.append(max_new_tokens)
            clock[0] += 0.5 + 0.1 * (max_new_tokens - 1)  # prefill 0.5 s, 0.1 s per decode step

    m = Fake()
    r = ixe.measure_speed(m, byte_tok, prompt_tokens=100, new_tokens=11, repeats=3, batch_size=2)
    assert r.prefill_tokens_per_s == pytest.approx(2 * 100 / 0.5)
    assert r.decode_tokens_per_s == pytest.approx(2 * 10 / 1.0)
    assert m.calls == [11, 1, 11, 1, 11, 1, 11]  # warm-up, then (prefill, full) x repeats
    with pytest.raises(ValueError, match="new_tokens"):
        ixe.measure_speed(m, byte_tok, new_tokens=1)


def test_measure_speed_real_tiny_model(byte_model, byte_tok):
    r = ixe.measure_speed(byte_model, byte_tok, prompt_tokens=16, new_tokens=4, repeats=1, threads=1)
    assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0 and r.threads == 1


def test_prompt_ids_rows_differ(byte_tok):
    ids = ixe.prompt_ids(byte_tok, 32, batch_size=3)
    assert ids.shape == (3, 32) and not torch.equal(ids[0], ids[1])


def test_peak_rss_sees_allocation():
    def work():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB
        time.sleep(0.05)  # held long enough for the sampler as well as the kernel's mark
        return t.sum().item()

    base = ixe.trimmed_rss()  # freed heap handed back, so the 64 MiB must be new pages
    result, peak = ixe.peak_rss(work)
    assert result == 64 * 2**20 // 4
    assert peak >= base + 60 * 2**20


def test_kv_cache_bytes_counts_keys_and_values(byte_model):
    cache = DynamicCache(config=byte_model.config)
    with torch.no_grad():
        byte_model(torch.arange(3, 13)[None], cache=cache, use_cache=True)
    cfg = byte_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    want = cfg.num_hidden_layers * 2 * 1 * cfg.num_key_value_heads * 10 * head_dim * 4
    assert ixe.kv_cache_bytes(cache) == want
    assert ixe.kv_cache_bytes(None) == 0
