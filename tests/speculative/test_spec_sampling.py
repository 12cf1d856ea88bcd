"""Sampling: the verifier's output follows the target distribution exactly (chi-square tests)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.speculative import DraftModel, PromptLookup, verify_sampling
from infertrix.speculative import loop as spec_loop

Z_999 = 3.0902  # one-sided 0.1% normal quantile


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation (good for df >= 3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic, merging cells whose expected count is below 5 into one."""
    n = counts.sum().item()
    exp = probs.double() * n
    small = exp < 5
    obs_c, exp_c = counts[~small].double(), exp[~small]
    if small.any():
        obs_c = torch.cat([obs_c, counts[small].double().sum()[None]])
        exp_c = torch.cat([exp_c, exp[small].sum()[None]])
    keep = exp_c > 0
    if counts[probs == 0].sum() > 0:  # a sequence of probability 0 was emitted
        return math.inf, int(keep.sum()) - 1
    stat = (((obs_c - exp_c) ** 2)[keep] / exp_c[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("with_q", [False, True])
def test_verifier_first_token_follows_target(with_q):
    """One step, many rows: the first emitted token is distributed as p_0 whatever q proposes."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 200_000, 5
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.3, 0.3, 0.2]])  # p_0, p_1
    q = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5])  # a poor draft: mass where p has little
    drafts = torch.multinomial(q.expand(rows, vocab), 1, generator=g)  # [rows, 1]
    probs = p[None].expand(rows, 2, vocab).contiguous()
    qprobs = q[None, None].expand(rows, 1, vocab).contiguous() if with_q else None
    lengths = torch.ones(rows, dtype=torch.long)
    accepted, nxt = verify_sampling(probs, drafts, lengths, qprobs, generator=g)
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    stat, df = chi2(torch.bincount(first, minlength=vocab), p[0])
    assert stat < chi2_critical(df), (stat, df)
    # acceptance rate is sum_x min(p, q) for a sampled draft, sum_x p(x) q(x) for a point mass
    rate = accepted.float().mean().item()
    expected = torch.minimum(p[0], q).sum().item() if with_q else (p[0] * q).sum().item()
    assert abs(rate - expected) < 0.01
    # when accepted, the bonus token is distributed as p_1
    bonus = nxt[accepted == 1]
    stat, df = chi2(torch.bincount(bonus, minlength=vocab), p[1])
    assert stat < chi2_critical(df), (stat, df)


SMALL = dict(vocab_size=6, pad_token_id=0, bos_token_id=1, eos_token_id=None)
NEW = 4


def exact_distribution(model, prompt: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """P(t1..t4 | prompt) under temperature + top-k, for all 6**4 continuations, by enumeration."""
    vocab = SMALL["vocab_size"]
    conts = torch.tensor(list(itertools.product(range(vocab), repeat=NEW)))
    seqs = torch.cat([prompt.expand(len(conts), -1), conts], 1)
    with torch.no_grad():
        logits = model(seqs).logits[:, prompt.shape[1] - 1 : -1].double() / temperature
    kth = logits.topk(top_k, -1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, -math.inf)
    logp = torch.log_softmax(logits, -1).gather(-1, conts[..., None]).squeeze(-1)
    return logp.sum(-1).exp()


def sample_counts(model, prompt, calls: int, rows: int, **kw) -> torch.Tensor:
    vocab = SMALL["vocab_size"]
    counts = torch.zeros(vocab**NEW, dtype=torch.long)
    weights = torch.tensor([vocab ** (NEW - 1 - i) for i in range(NEW)])
    for _ in range(calls):
        out = model.generate(prompt.expand(rows, -1), do_sample=True, max_new_tokens=NEW, **kw)
        idx = (out[:, -NEW:] * weights).sum(-1)
        counts += torch.bincount(idx, minlength=vocab**NEW)
    return counts


def _small_model(seed=0):
    model = make_tiny("llama", seed=seed, **SMALL)
    with torch.no_grad():  # sharpen the random model so the distribution has structure
        model.lm_head.weight.mul_(6.0)
    model.generation_config.eos_token_id = None
    return model


PROMPT = torch.tensor([[1, 3, 4, 5, 3, 4, 5, 3, 4]])


@pytest.mark.parametrize("make", ["pld", "draft_model"])
def test_sampled_sequences_follow_model_distribution(make):
    torch.manual_seed(1234)
    model = _small_model()
    kw = dict(temperature=0.7, top_k=3, top_p=1.0)
    exact = exact_distribution(model, PROMPT, 0.7, 3)
    assert abs(exact.sum().item() - 1) < 1e-6
    t = PromptLookup(num_tokens=3, adaptive=False) if make == "pld" else DraftModel(draft=_small_model(seed=5), num_tokens=3, confidence=0.0, adaptive=False)
    ix.optimize(model, t)
    counts = sample_counts(model, PROMPT, calls=2, rows=1000, **kw)
    st = ix.speculative.speculative_stats(model).total
    assert st.drafted > 300 and 0 < st.accepted < st.drafted  # both branches of the rule ran
    stat, df = chi2(counts, exact)
    assert stat < chi2_critical(df), (stat, df)


def test_chi_square_detects_a_wrong_verifier(monkeypatch):
    """Power check: accepting every draft (a wrong rule) is caught by the same test."""
    torch.manual_seed(99)
    model = _small_model()
    exact = exact_distribution(model, PROMPT, 0.7, 3)

    def accept_all(probs, drafts, lengths, draft_probs, generator=None):
        rows = torch.arange(drafts.shape[0])
        return lengths, torch.multinomial(probs[rows, lengths], 1).squeeze(1)

    monkeypatch.setattr(spec_loop, "verify_sampling", accept_all)
    ix.optimize(model, PromptLookup(num_tokens=3, adaptive=False))
    counts = sample_counts(model, PROMPT, calls=1, rows=1000, temperature=0.7, top_k=3, top_p=1.0)
    stat, df = chi2(counts, exact)
    assert stat > chi2_critical(df)
