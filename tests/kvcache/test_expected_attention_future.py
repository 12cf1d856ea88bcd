"""Expected Attention on real forwards: its scores are the paper's formula (kvpress's
``ExpectedAttentionPress``) on every decode path and in a padded batch, and what it keeps is what the
next tokens' queries attend to, on a tiny random Llama and on SmolLM2 (RULER-like needle prompt)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.kvcache import ExpectedAttention
from infertrix.kvcache.attention import compute_queries
from infertrix.kvcache.context import FORCE_KEEP
from infertrix.kvcache.replay import record_prefill, replay


@pytest.fixture
def scored(monkeypatch):
    """{layer rank: (scores [B, H_kv, S], target)} of every ExpectedAttention.score call."""
    seen = {}
    real = ExpectedAttention.score

    def score(self, ctx):
        out = real(self, ctx)
        seen[ctx.layer_rank] = (out.detach(), ctx.target)
        return out

    monkeypatch.setattr(ExpectedAttention, "score", score)
    return seen


@torch.no_grad()
def paper_scores(model, ids, layer: int, policy: ExpectedAttention) -> torch.Tensor:
    """[H_kv, n] the paper's scores of one unpadded row, from the model's own modules: mean and
    covariance of the pre-RoPE queries after the sinks, each rotated by RoPE's matrix averaged over
    the absolute positions n .. n + n_future_positions - 1, then exp(s mu.k + s^2 k.Sigma.k / 2) over
    the non-sink post-RoPE keys, normalised, averaged over each KV head's group, times |v|."""
    rec = record_prefill(model, ids)
    attn = model.model.layers[layer].self_attn
    hidden = rec.inputs[layer][0][0]  # [n, hidden]
    keys, values = rec.cache.layers[layer].keys[0].float(), rec.cache.layers[layer].values[0].float()
    n, d, sink = hidden.shape[0], attn.head_dim, policy.n_sink
    pre = attn.q_proj(hidden[sink:]).view(n - sink, -1, d).transpose(0, 1).float()  # [H_q, n - sink, D]
    mu = pre.mean(1)
    centred = pre - mu[:, None]
    sigma = centred.transpose(1, 2) @ centred / (n - sink)
    cos, sin = model.model.rotary_emb(hidden[None], torch.arange(n, n + policy.n_future_positions)[None])
    half = d // 2
    swap = torch.zeros(d, d)  # x -> rotate_half(x) = (-x2, x1)
    swap[:half, half:], swap[half:, :half] = -torch.eye(half), torch.eye(half)
    rot = (torch.diag_embed(cos[0]) + torch.diag_embed(sin[0]) @ swap).mean(0).float()
    mu, sigma = mu @ rot.T, rot @ sigma @ rot.T
    g = mu.shape[0] // keys.shape[0]
    k = keys.repeat_interleave(g, 0)  # [H_q, n, D]
    s = attn.scaling
    logits = s * torch.einsum("hnd,hd->hn", k, mu) + 0.5 * s**2 * torch.einsum("hnd,hde,hne->hn", k, sigma, k)
    logits[:, :sink] = float("-inf")
    probs = torch.softmax(logits, -1).view(keys.shape[0], g, n).mean(1)
    scores = probs * values.norm(dim=-1)
    scores[:, :sink] += FORCE_KEEP
    return scores


@pytest.mark.parametrize("engine", ["engine(enabled=false)", "engine"])
def test_scores_are_the_papers_formula_in_a_padded_batch(scored, engine):
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (1, n), generator=gen) for n in (40, 27)]
    policy = ExpectedAttention(compression=0.5, n_future_positions=48)
    width = max(r.shape[1] for r in rows)
    batch, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    ix.optimize(model, policy, engine)
    try:
        model.generate(batch, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    finally:
        ix.restore(model)
    assert sorted(scored) == list(range(model.config.num_hidden_layers))
    for layer, (scores, _) in scored.items():
        for i, r in enumerate(rows):
            want = paper_scores(model, r, layer, policy)
            torch.testing.assert_close(scores[i, :, width - r.shape[1] :], want, rtol=1e-4, atol=1e-7)


@torch.no_grad()
def kept_attention(model, ids, prompt: int, policy: ExpectedAttention, scored, seed: int = 0) -> dict[str, float]:
    """Share of the attention that the queries of ``ids[:, prompt:]`` pay to the prompt's non-sink
    keys which the kept tokens hold, averaged over layers, for the policy's choice (made from the
    prompt alone, on the hook path) and for the oracle, recency and random choices of as many tokens."""
    full = record_prefill(model, ids)
    ix.optimize(model, policy)
    try:
        replay(model, record_prefill(model, ids[:, :prompt]), policy)
    finally:
        ix.restore(model)
    gen = torch.Generator().manual_seed(seed)
    sink, out = policy.n_sink, {}
    for layer, (scores, target) in scored.items():
        attn = model.model.layers[layer].self_attn
        hidden, pos, _ = full.inputs[layer]
        q = compute_queries(attn, hidden, pos)[:, :, prompt:].float()
        keys = full.cache.layers[layer].keys.float()
        hkv, n = keys.shape[1], ids.shape[1]
        g = q.shape[1] // hkv
        logits = torch.einsum("bhqd,bhsd->bhqs", q, keys.repeat_interleave(g, 1)) * attn.scaling
        future = torch.arange(n)[None, :] > torch.arange(prompt, n)[:, None]
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1)[..., sink:prompt]
        mass = probs.mean(2).view(hkv, g, prompt - sink).mean(1)  # [H_kv, prompt - sink]
        choices = {"policy": scores[0, :, sink:], "oracle": mass,
                   "recent": torch.arange(prompt - sink, dtype=torch.float).expand(hkv, -1),
                   "random": torch.rand(hkv, prompt - sink, generator=gen)}
        for name, chosen in choices.items():
            keep = torch.zeros_like(mass).scatter(1, chosen.topk(target - sink, -1).indices, 1.0)
            out[name] = out.get(name, 0.0) + float((keep * mass).sum() / mass.sum()) / len(scored)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_llama_keeps_what_the_continuation_attends_to(scored, seed):
    """Random init attends almost uniformly; queries and keys scaled 16x give peaked attention (the
    oracle keeps ~0.94 of it with half the tokens). Measured: policy ~0.75, recency and random ~0.48."""
    model = make_tiny("llama", seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16.0)
            layer.self_attn.k_proj.weight.mul_(16.0)
    ids = torch.randint(3, 128, (1, 128), generator=torch.Generator().manual_seed(seed))
    got = kept_attention(model, ids, 96, ExpectedAttention(compression=0.5, n_future_positions=32), scored, seed)
    assert got["policy"] > max(got["recent"], got["random"]) + 0.15, got
    assert got["oracle"] > 0.85, got


@pytest.mark.smollm2
def test_smollm2_keeps_what_the_question_and_answer_attend_to(smollm2, scored):
    """A RULER niah-like prompt (needle in prose, then the question, compressed question-agnostic): the
    share of what the question's and the answer's queries attend to that the compressed context holds.
    This is not RULER's score: on RULER's niah tasks SmolLM2-135M loses the needle under this method
    (kvpress's implementation too) in the few retrieval heads, whose context queries do not look for it."""
    from infertrix.eval.passkey import passkey_prompt

    model, tok = smollm2
    prompt = passkey_prompt(tok, context_tokens=600, depth=0.5, key=68301)
    cut = prompt.rindex("What")  # question-agnostic: the context is compressed before the question
    context = tok(prompt[:cut]).input_ids
    ids = torch.tensor([context + tok(prompt[cut:] + " 68301.", add_special_tokens=False).input_ids])
    got = kept_attention(model, ids, len(context), ExpectedAttention(compression=0.5), scored)
    # measured: policy 0.85, oracle 0.94, recency 0.58, random 0.48
    assert got["policy"] > max(got["recent"], got["random"]) + 0.15, got
