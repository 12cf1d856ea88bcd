"""Expected Attention's statistics equal the paper's (pre-RoPE mean and covariance, RoPE averaged over
the absolute future positions), though it only sees post-RoPE queries and no absolute position."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from infertrix.core import ConfigError
from infertrix.kvcache import ExpectedAttention, ScoreContext
from infertrix.kvcache.expected_attention import rope_frequencies, rotate

CONFIG = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def context(keys, queries, visible=None) -> ScoreContext:
    module = SimpleNamespace(config=CONFIG)
    return ScoreContext(module, None, 0, keys, keys.clone() + 1.0, queries, visible, 1 / math.sqrt(keys.shape[-1]))


def test_statistics_match_the_pre_rope_formulation():
    g = torch.Generator().manual_seed(0)
    d, w, start, future = 8, 6, 37, 16
    pre = torch.randn(1, 2, w, d, generator=g)  # pre-RoPE queries of tokens start .. start + w - 1
    freq = rope_frequencies(CONFIG, d)
    pos = torch.arange(start, start + w, dtype=torch.float)
    post = rotate(pre, pos[:, None] * freq)
    keys = torch.zeros(1, 1, start + w, d)  # the queries are the last w stored tokens', none of them a sink
    mean, cov = ExpectedAttention(n_future_positions=future).query_statistics(context(keys, post))
    # the paper: statistics of the pre-RoPE queries, rotated by RoPE averaged over the next positions
    ahead = torch.arange(start + w, start + w + future, dtype=torch.float)[:, None] * freq
    eye = torch.eye(d)
    rot = torch.stack([rotate(eye, a).T for a in ahead]).mean(0)  # [D, D]: x -> mean_p R_p x
    mu = pre.mean(2)
    centred = pre - pre.mean(2, keepdim=True)
    sigma = centred.transpose(-1, -2) @ centred / w
    torch.testing.assert_close(mean, mu @ rot.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cov, rot @ sigma @ rot.T, atol=1e-4, rtol=1e-4)


def test_keeps_sinks_and_scores_a_padded_row_as_alone():
    g = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)  # every token's
    policy = ExpectedAttention(n_sink=2, n_future_positions=8)
    scores = policy.score(context(keys, queries))
    assert bool((scores[0, 0, :2] >= 1e29).all()) and bool((scores[0, 0, 2:] < 1e29).all())
    padded = torch.cat([torch.randn(1, 1, 3, 8, generator=g), keys], dim=2)
    pq = torch.cat([torch.randn(1, 2, 3, 8, generator=g), queries], dim=2)  # the pads' queries are left out
    visible = torch.tensor([[False] * 3 + [True] * 12])
    ctx = context(padded, pq, visible)
    ctx.values = torch.cat([padded[:, :, :3], keys + 1.0], dim=2)
    torch.testing.assert_close(policy.score(ctx)[..., 3:], scores)


def test_sinks_are_left_out_of_the_statistics_and_the_normalisation():
    """As kvpress does: the first n_sink tokens' queries are outliers, and a head that pays
    most of its attention to them must still count as much as its group's other heads."""
    g = torch.Generator().manual_seed(2)
    keys, queries = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    policy = ExpectedAttention(n_sink=3, n_future_positions=8)
    scores = policy.score(context(keys, queries))
    loud = keys.clone()
    loud[:, :, :3] *= 50.0  # sinks that would take every query's attention
    odd = queries.clone()
    odd[:, :, :3] = 100.0  # and outlier queries
    torch.testing.assert_close(policy.score(context(loud, odd))[..., 3:], scores[..., 3:])
    mean, cov = policy.query_statistics(context(keys, queries))
    torch.testing.assert_close(policy.query_statistics(context(keys, queries[:, :, 3:]))[0], mean)
    # per query head the rest sums to one, so the group's mean of it does too (values' norms aside)
    assert abs(ExpectedAttention(n_sink=3, use_vnorm=False).score(context(loud, odd))[0, 0, 3:].sum() - 1) < 1e-5


def future_attention_case(seed: int, d: int = 32, hkv: int = 2, g: int = 2, prompt: int = 256, future: int = 64):
    """Queries with a strong common direction plus noise, RoPE-rotated at their positions (so which keys
    the future queries attend to depends on both content and distance), and the share of the future
    queries' attention (over the non-sink prompt keys) that a quarter of the keys keeps, by who chose them."""
    gen = torch.Generator().manual_seed(seed)
    freq = rope_frequencies(CONFIG, d)
    pre_q = 3.0 * torch.randn(1, hkv * g, 1, d, generator=gen) + torch.randn(1, hkv * g, prompt + future, d, generator=gen)
    pos = torch.arange(prompt + future, dtype=torch.float)[:, None] * freq
    q, k = rotate(pre_q, pos), rotate(torch.randn(1, hkv, prompt, d, generator=gen), pos[:prompt])
    scale = 1 / math.sqrt(d)
    logits = torch.einsum("bhqd,bhsd->bhqs", q[:, :, prompt:], k.repeat_interleave(g, 1)) * scale
    mass = torch.softmax(logits[..., 4:], -1).mean(2).view(hkv, g, prompt - 4).mean(1)  # the truth
    ctx = ScoreContext(SimpleNamespace(config=CONFIG), None, 0, k, torch.ones_like(k), q[:, :, :prompt], None, scale)
    predicted = ExpectedAttention(n_future_positions=future).score(ctx)[0, :, 4:]

    def kept(chosen: torch.Tensor) -> float:
        keep = torch.zeros_like(mass).scatter(1, chosen.topk((prompt - 4) // 4, -1).indices, 1.0)
        return float((keep * mass).sum() / mass.sum())

    recency = torch.arange(prompt - 4.0).expand(hkv, -1)
    return kept(predicted), kept(mass), kept(recency), kept(torch.rand(hkv, prompt - 4, generator=gen))


def test_keeps_what_future_queries_attend_to():
    """Close to the oracle (the future queries' own attention: 0.92-0.99 of it here), far above a recency
    or random choice (0.2-0.4); queries rotated the wrong way fall to ~0.83 of the oracle."""
    cases = [future_attention_case(seed) for seed in range(5)]
    for predicted, _, recent, chance in cases:
        assert predicted > max(recent, chance) + 0.3
    assert sum(predicted / oracle for predicted, oracle, _, _ in cases) / len(cases) > 0.9


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="n_future_positions"):
        ExpectedAttention(n_future_positions=0)
    with pytest.raises(ConfigError, match="n_sink"):
        ExpectedAttention(n_sink=-1)
