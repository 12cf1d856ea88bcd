"""The one verification rule: exact speculative sampling, with greedy as its special case.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML
2023, https://arxiv.org/abs/2211.17192) and Chen et al., "Accelerating Large Language Model
Decoding with Speculative Sampling" (2023, https://arxiv.org/abs/2302.01318). For each row, with
target distributions ``p_0 .. p_k`` (after the call's logits processors) at the k draft positions
and one more, and draft tokens ``d_i`` drawn from ``q_i``:

  - accept ``d_i`` while ``u_i <= p_i(d_i) / q_i(d_i)`` with ``u_i ~ U(0, 1)``;
  - at the first rejection ``j`` emit a token from ``normalise(max(p_j - q_j, 0))``;
  - if all k are accepted, emit a bonus token from ``p_k``.

The emitted tokens are distributed exactly as sampling from the target alone. A draft without
probabilities is a point mass ``q_i = onehot(d_i)``: acceptance ``p_i(d_i)``, and the residual is
``p_j`` with ``d_j`` removed. Greedy decoding is the limit where ``p`` is a point mass on its
argmax: accept while ``d_i == argmax p_i``, then emit ``argmax p_j``: token-identical to greedy
decoding of the target alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def verify_greedy(scores: Tensor, drafts: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy acceptance.

    scores [B, W, V] (processed logits, W >= max length + 1), drafts [B, W - 1], lengths [B].
    Returns (accepted [B] counts, next_token [B]).
    """
    target = scores.argmax(-1)  # [B, W]
    width = drafts.shape[1]
    pos = torch.arange(width, device=drafts.device)[None, :]
    ok = (drafts == target[:, :width]) & (pos < lengths[:, None])
    accepted = ok.long().cumprod(-1).sum(-1)
    next_token = target.gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token


def verify_sampling(
    probs: Tensor,
    drafts: Tensor,
    lengths: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative-sampling acceptance.

    probs [B, W, V] target probabilities; drafts [B, W - 1]; lengths [B]; draft_probs
    [B, W - 1, V] or None (point masses). Returns (accepted [B], next_token [B]).
    """
    batch, width = drafts.shape
    pos = torch.arange(width, device=drafts.device)[None, :]
    valid = pos < lengths[:, None]
    p_d = probs[:, :width].gather(-1, drafts[..., None]).squeeze(-1)  # p_i(d_i)
    if draft_probs is None:
        ratio = p_d
    else:
        q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        ratio = p_d / q_d.clamp_min(torch.finfo(q_d.dtype).tiny)
    u = torch.rand(ratio.shape, generator=generator, device=ratio.device, dtype=ratio.dtype)
    ok = (u <= ratio) & valid
    accepted = ok.long().cumprod(-1).sum(-1)  # [B]

    rows = torch.arange(batch, device=drafts.device)
    p_next = probs[rows, accepted]  # [B, V]: p_j at the first rejection, or p_k (bonus)
    rejected = accepted < lengths
    residual = p_next.clone()
    if bool(rejected.any()):
        j = accepted.clamp_max(max(width - 1, 0))
        if draft_probs is None:
            d = drafts[rows, j]
            sub = torch.zeros_like(p_next).scatter_(1, d[:, None], p_next.gather(1, d[:, None]))
        else:
            sub = draft_probs[rows, j].to(p_next.dtype).clamp_max(p_next)  # min(p, q)
        res = p_next - sub  # max(p - q, 0)
        total = res.sum(-1, keepdim=True)
        # total == 0 only when p == q exactly, where a rejection has probability 0; keep p then
        res = torch.where(total > 0, res / total.clamp_min(torch.finfo(res.dtype).tiny), p_next)
        residual = torch.where(rejected[:, None], res, p_next)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return accepted, next_token
