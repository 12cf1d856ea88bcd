"""Merging evicted tokens into their most similar kept token instead of dropping them.

Wan et al. 2024, "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of
Large Language Models", https://arxiv.org/abs/2406.13035. Any policy merges with ``merge=True``
(:meth:`~infertrix.kvcache.KVPolicy.evict` calls this); :class:`~infertrix.kvcache.D2O` is H2O's
scores with merging on.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_evicted(
    keys: Tensor, values: Tensor, keep: Tensor, visible: Tensor | None, threshold: float,
    kept: Tensor | None = None,
):
    """Return keys/values where each kept token absorbs the evicted tokens closest to it.

    Each evicted (non-pad) token e goes to the kept token c with the highest key cosine similarity
    ``sim``; when ``sim >= threshold`` it is averaged in with weight ``sim``:
    ``k_c <- (k_c + sum_e sim_e k_e) / (1 + sum_e sim_e)``, and the same for values.
    Only the kept slots change; ``keep`` is [B, H, K] ascending, or with ``kept`` [B, H, K] bool a
    row's slots of which only those marked True are its tokens (the others are fillers, as evicted:
    :mod:`~.rows`). Cost: an [E, K] similarity per row
    and KV head for the E = S - K evicted tokens (not [S, K]: kept tokens are never merged).
    """
    b, h, s, d = keys.shape
    dropped = torch.ones(b, h, s, dtype=torch.bool, device=keys.device)
    dropped.scatter_(-1, keep, False if kept is None else ~kept)
    evicted = dropped if visible is None else dropped & visible[:, None, :]  # pads merge nowhere
    if not bool(evicted.any()):
        return keys, values
    # the (at most) S - K dropped slots of every row and head, ascending (a stable sort puts them first)
    n_out = s - (keep.shape[-1] if kept is None else int(kept.sum(-1).min()))
    out_idx = dropped.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n_out]
    kf, vf = keys.float(), values.float()
    kn = torch.nn.functional.normalize(kf, dim=-1)
    kept_n = torch.gather(kn, 2, keep.unsqueeze(-1).expand(-1, -1, -1, d))  # [B,H,K,D]
    out_idx_d = out_idx.unsqueeze(-1).expand(-1, -1, -1, d)
    sim = torch.matmul(torch.gather(kn, 2, out_idx_d), kept_n.transpose(-1, -2))  # [B,H,E,K]
    if kept is not None:  # a filler absorbs nothing
        sim = sim.masked_fill(~kept[:, :, None, :], float("-inf"))
    best_sim, best = sim.max(dim=-1)  # [B,H,E]
    merge = torch.gather(evicted, -1, out_idx) & (best_sim >= threshold)
    weight = torch.where(merge, best_sim, torch.zeros_like(best_sim))
    target_slot = torch.gather(keep, -1, best)  # slot of the chosen kept token, [B,H,E]
    target_d = target_slot.unsqueeze(-1).expand(-1, -1, -1, d)
    num_k = kf.clone()
    num_v = vf.clone()
    num_k.scatter_add_(2, target_d, torch.gather(kf, 2, out_idx_d) * weight.unsqueeze(-1))
    num_v.scatter_add_(2, target_d, torch.gather(vf, 2, out_idx_d) * weight.unsqueeze(-1))
    den = torch.ones(b, h, s, dtype=torch.float32, device=keys.device)
    den.scatter_add_(2, target_slot, weight)
    return (num_k / den.unsqueeze(-1)).to(keys.dtype), (num_v / den.unsqueeze(-1)).to(values.dtype)
