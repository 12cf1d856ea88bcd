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
    mean, cov = ExpectedAttention(n_future_positions=future).query_statistics(context(torch.zeros(1, 1, w, d), post))
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


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="n_future_positions"):
        ExpectedAttention(n_future_positions=0)
    with pytest.raises(ConfigError, match="n_sink"):
        ExpectedAttention(n_sink=-1)
