"""Log-likelihood through the compressed KV cache: loglikelihood(), compressed_scoring, the warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix import eval as ev
from infertrix.core import ConfigError, UnsupportedModelError


def _request(seed: int = 0, context: int = 200, continuation: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (context,), generator=g), torch.randint(3, 128, (continuation,), generator=g)


def _optimized(recipe: str, arch: str = "llama"):
    model = make_tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ix.optimize(model, recipe)
    return model


def _plain_forward_warnings(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if "compressed_scoring" in str(w.message)]


def test_loglikelihood_under_snapkv_differs_from_the_plain_forward():
    ctx, cont = _request()
    base = ev.loglikelihood_tokens(make_tiny("llama"), ctx, cont)
    model = _optimized("snapkv:0.5")
    honest = ev.loglikelihood_tokens(model, ctx, cont)
    assert abs(honest - base) > 1e-3
    # what a harness's plain forward gives: the baseline, whatever the policy
    ids = torch.cat([ctx, cont])[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].float(), -1)
    plain = float(logp.gather(-1, cont[:, None]).sum())
    assert plain == pytest.approx(base, abs=1e-4)


def test_single_token_continuation_is_scored_against_the_compressed_cache():
    ctx, cont = _request(seed=1, continuation=1)
    base = ev.loglikelihood_tokens(make_tiny("llama"), ctx, cont)
    assert abs(ev.loglikelihood_tokens(_optimized("snapkv:0.5"), ctx, cont) - base) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_loglikelihood_with_a_full_cache_equals_the_baseline(arch):
    ctx, cont = _request(seed=2)
    base = ev.loglikelihood_tokens(make_tiny(arch), ctx, cont)
    assert ev.loglikelihood_tokens(_optimized("snapkv:0", arch), ctx, cont) == pytest.approx(base, abs=1e-4)
    # a budget above the context keeps every token
    full = _optimized("snapkv(budget=1000)", arch)
    assert ev.loglikelihood_tokens(full, ctx, cont) == pytest.approx(base, abs=1e-4)


def test_loglikelihood_under_kivi_steps_through_the_quantized_cache():
    ctx, cont = _request(seed=3)
    base = ev.loglikelihood_tokens(make_tiny("llama"), ctx, cont)
    assert abs(ev.loglikelihood_tokens(_optimized("kivi:2"), ctx, cont) - base) > 1e-4


def test_loglikelihood_from_text_splits_like_lm_eval():
    tok = _word_tokenizer()
    model = make_tiny("llama")
    ctx, cont = "w1 w2 w3 w4 ", "w5 w6"
    ids = tok("w1 w2 w3 w4 w5 w6", add_special_tokens=False).input_ids
    assert ev.loglikelihood(model, tok, ctx, cont) == pytest.approx(
        ev.loglikelihood_tokens(model, ids[:4], ids[4:]), abs=1e-6
    )


def test_compressed_scoring_compresses_plain_forwards_after_the_first_chunk():
    ctx, cont = _request(seed=4)
    ids = torch.cat([ctx, cont])[None]
    base_model = make_tiny("llama")
    with torch.no_grad():
        base = base_model(ids).logits
        model = _optimized("snapkv:0.5")
        own_forward = model.__dict__.get("forward")  # the engine's (on by default), or none
        with ev.compressed_scoring(model, chunk_tokens=64):
            scored = model(ids)
            loss = model(ids, labels=ids).loss
        plain = _optimized("snapkv:0.5")  # left alone after the block: a plain forward again
        assert model.__dict__.get("forward") is own_forward
    assert torch.allclose(scored.logits[:, :64], base[:, :64], atol=1e-5)
    assert (scored.logits[:, 64:] - base[:, 64:]).abs().amax() > 1e-3
    ref = base_model.loss_function(logits=scored.logits, labels=ids, vocab_size=base_model.config.vocab_size)
    assert loss == pytest.approx(float(ref), abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert torch.allclose(plain(ids).logits, base, atol=1e-5)
    # no-op policy: the chunked forward is the full-cache forward
    noop = _optimized("snapkv:0")
    with torch.no_grad(), ev.compressed_scoring(noop, chunk_tokens=32):
        assert torch.allclose(noop(ids).logits, base, atol=1e-4)


def test_compressed_scoring_rows_do_not_depend_on_their_batch():
    model = _optimized("snapkv:0.5")
    a, b = torch.randint(3, 128, (150,)), torch.randint(3, 128, (100,))
    with torch.no_grad(), ev.compressed_scoring(model):
        alone_a, alone_b = model(a[None]).logits[0], model(b[None]).logits[0]
        # right padding without a mask (lm-eval's HFLM): real positions are causal, pads come after
        right = torch.stack([a, torch.cat([b, torch.zeros(50, dtype=torch.long)])])
        out = model(right).logits
        assert torch.allclose(out[0], alone_a, atol=1e-5)
        assert torch.allclose(out[1, :100], alone_b, atol=1e-5)
        # left padding with a mask: the padded row runs alone
        left = torch.stack([a, torch.cat([torch.zeros(50, dtype=torch.long), b])])
        mask = (torch.arange(150) >= torch.tensor([[0], [50]])).long()
        out = model(left, attention_mask=mask).logits
        assert torch.allclose(out[0], alone_a, atol=1e-5)
        assert torch.allclose(out[1, 50:], alone_b, atol=1e-5)


def test_compressed_scoring_refusals():
    with pytest.raises(UnsupportedModelError, match="optimize"):
        with ev.compressed_scoring(make_tiny("llama")):
            pass
    model = _optimized("snapkv:0.5")
    with pytest.raises(ConfigError, match="chunk_tokens >= 63"):
        with ev.compressed_scoring(model, chunk_tokens=32):
            pass
    with ev.compressed_scoring(model), pytest.raises(ConfigError, match="output_hidden_states"):
        model(torch.randint(3, 128, (1, 80)), output_hidden_states=True)


def test_plain_forward_warns_once_per_model():
    ids = torch.randint(3, 128, (1, 100))
    model = _optimized("snapkv:0.5")
    with torch.no_grad():
        caught = _plain_forward_warnings(lambda: [model(ids), model(ids), model(input_ids=ids, use_cache=False)])
        assert len(caught) == 1 and "SnapKV" in str(caught[0].message)
        other = _optimized("snapkv:0.5")
        assert len(_plain_forward_warnings(lambda: other(ids))) == 1
        ix.restore(other)  # the hook goes with the policy
        assert not other._forward_pre_hooks


def test_no_warning_inside_generate_scoring_or_single_tokens():
    ids = torch.randint(3, 128, (1, 100))
    model = _optimized("snapkv:0.5")

    def calls():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        ev.loglikelihood_tokens(model, ids[0, :80], ids[0, 80:])
        with ev.compressed_scoring(model):
            model(ids)
        model(ids[:, :1])

    with torch.no_grad():
        assert _plain_forward_warnings(calls) == []
        noop = _optimized("snapkv:0")  # a policy that changes nothing is not bypassed
        assert _plain_forward_warnings(lambda: noop(ids)) == []


def test_no_warning_with_speculative_decoding():
    ids = torch.randint(3, 128, (1, 100))
    pld = _optimized("pld")  # lossless: its plain forward is the model's
    both = _optimized("snapkv:0.5,pld")
    with torch.no_grad():
        assert _plain_forward_warnings(lambda: (pld(ids), pld.generate(ids, max_new_tokens=4))) == []
        assert _plain_forward_warnings(lambda: both.generate(ids, max_new_tokens=8, do_sample=False)) == []


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(125)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_lm_eval_loglikelihood_on_an_opted_in_model():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = _word_tokenizer()
    g = torch.Generator().manual_seed(5)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 125, (n,), generator=g))

    pairs = [(words(150), " " + words(6)), (words(120), " " + words(1)), (words(90), " " + words(10))]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    def scores(model):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", max_length=512)
        return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]

    base = scores(make_tiny("llama"))
    model = _optimized("snapkv:0.5")
    caught = _plain_forward_warnings(lambda: scores(model))
    assert len(caught) == 1  # the harness's plain forward bypasses the policy, and says so once
    assert scores(model) == pytest.approx(base, abs=1e-4)
    with ev.compressed_scoring(model):
        honest = scores(model)
    assert all(abs(h - b) > 1e-4 for h, b in zip(honest, base, strict=True))
    # each request alone, through the chunked protocol, equals its score in lm-eval's padded batch
    with ev.compressed_scoring(model, chunk_tokens=63):
        for (ctx, cont), h in zip(pairs, honest, strict=True):
            ids = tok(ctx + cont, add_special_tokens=False).input_ids
            n = len(tok(ctx, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids[:-1]])).logits[0, n - 1 :]
            ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[n:])[:, None]).sum()
            assert h == pytest.approx(float(ref), abs=1e-4)
