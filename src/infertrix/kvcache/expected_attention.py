"""Expected Attention: score keys by the attention future queries are expected to pay them.

Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", https://arxiv.org/abs/2510.00636 (kvpress's ``ExpectedAttentionPress``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import ConfigError, register_transform
from .attention import rotate_half
from .context import FORCE_KEEP, ScoreContext
from .policy import KVPolicy


def rope_frequencies(config, head_dim: int) -> Tensor:
    """RoPE's angle per position of each rotated pair [head_dim / 2] for a full-attention layer."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = isinstance(params.get("full_attention"), dict)  # Gemma 3: one entry per layer type
    if nested:
        params = params["full_attention"]
    kind = params.get("rope_type", "default")
    if kind == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freq, _ = ROPE_INIT_FUNCTIONS[kind](config, layer_type="full_attention" if nested else None)
    return freq.float()


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the RoPE pairs of ``x`` [..., D] by ``angles`` [..., D/2] (broadcast)."""
    a = torch.cat([angles, angles], dim=-1)
    return x * a.cos() + rotate_half(x) * a.sin()


@register_transform("expected_attention")
@dataclass
class ExpectedAttention(KVPolicy):
    """Models the queries of the next ``n_future_positions`` tokens as a Gaussian: mean and covariance
    of the last ``query_window`` queries, brought to the current position (each rotated on by its
    distance to the last token) and then by RoPE's rotation averaged over the future positions. A key
    scores the expected softmax numerator exp(s mu.k + s^2 k.Sigma.k / 2) (s the softmax scaling),
    normalised over the keys, averaged over each KV head's query group, times its value's norm. The
    first ``n_sink`` tokens of each row are always kept and, as kvpress does, left out of
    the statistics (their queries are outliers) and of the normalisation (a head that sinks most of its
    attention there would otherwise count for almost nothing in its group's average, and the group's
    other heads alone would rank the rest). The statistics are rotation-equivariant, so
    they equal the paper's (pre-RoPE statistics, absolute future rotation) without absolute positions:
    padded rows score as alone. Costs one ``D x D`` covariance per query head and layer. Lossy: the
    context's queries stand for the future ones, so a head whose future queries look for what the
    context's never did (RULER's needle, in SmolLM2-135M's retrieval heads) loses it (kvpress's too).

    - ``n_future_positions``: future positions averaged over (kvpress: 512).
    - ``n_sink``: first tokens always kept, out of the statistics and the normalisation (kvpress: 4).
    - ``query_window``: recent queries the statistics come from, at most those since the last
      compression (kvpress uses every prompt query after the sinks; a window bounds the buffer).
    - ``use_covariance`` / ``use_vnorm``: the covariance term / the value-norm factor (both on in kvpress).
      Where a head's queries vary widely the covariance term dominates (SmolLM2-135M's retrieval heads:
      up to exp(250), one key takes all) and ranks the rest by it alone; on RULER niah_single_1/2 at 0.5
      SmolLM2 scores 0/10 with it (question-aware 0/0), 50/20 without (either protocol; 10 samples).
    """
    use_when = "question-agnostic compression (context cached before the question): predicts future attention"

    n_future_positions: int = 512
    n_sink: int = 4
    query_window: int = 1024
    use_covariance: bool = True
    use_vnorm: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("n_future_positions", "query_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"ExpectedAttention.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ConfigError(f"ExpectedAttention.n_sink must be an int >= 0, got {self.n_sink!r}")

    def score_queries(self) -> int:
        return self.query_window

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if rope_frequencies(config, head_dim).numel() != head_dim // 2:
            raise ConfigError(
                "ExpectedAttention needs RoPE over the whole head (partial rotary is not modelled); "
                "use SnapKV or KeyDiff for this model"
            )

    def compress_layer(self, ctx: ScoreContext) -> None:
        super().compress_layer(ctx)
        # the next statistics come from the tokens after this compression only: the base keeps the queries
        # of the tail every row and head still holds, which depends on the batch's other rows
        ctx.state.queries = None

    def query_statistics(self, ctx: ScoreContext) -> tuple[Tensor, Tensor | None]:
        """Mean [B, H_q, D] and covariance [B, H_q, D, D] of the future queries."""
        q = ctx.queries.float()  # [B, Hq, w, D], the last w tokens' post-RoPE queries
        b, _, w, d = q.shape
        freq = rope_frequencies(ctx.module.config, d).to(q.device)
        to_last = torch.arange(w - 1, -1, -1, device=q.device, dtype=torch.float)  # each to the last position
        u = rotate(q, to_last[:, None] * freq)
        weight = (self.token_rank(ctx)[:, -w:] >= self.n_sink).float()  # a sink's query is an outlier
        if ctx.visible is not None:  # a pad's query is not a query
            weight = weight * ctx.visible[:, -w:].float()
        weight = (weight / weight.sum(-1, keepdim=True).clamp_min(1))[:, None, :, None]  # [B, 1, w, 1]
        mean = (u * weight).sum(2)
        ahead = torch.arange(1, self.n_future_positions + 1, device=q.device, dtype=torch.float)[:, None] * freq
        c, s = ahead.cos().mean(0), ahead.sin().mean(0)  # the average future rotation, per pair
        eye = torch.eye(d, device=q.device)
        avg_rot = torch.diag(torch.cat([c, c])) + torch.diag(torch.cat([s, s])) @ rotate_half(eye).T
        mean = mean @ avg_rot.T
        if not self.use_covariance:
            return mean, None
        centred = (u - (u * weight).sum(2, keepdim=True)) * weight.sqrt()
        cov = centred.transpose(-1, -2) @ centred  # [B, Hq, D, D]
        return mean, avg_rot @ cov @ avg_rot.T

    def score(self, ctx: ScoreContext) -> Tensor:
        mean, cov = self.query_statistics(ctx)
        keys = ctx.keys.float()  # [B, Hkv, S, D]
        b, hkv, s, d = keys.shape
        g = mean.shape[1] // hkv
        mean = mean.view(b, hkv, g, d)
        logits = ctx.scaling * torch.einsum("bhgd,bhsd->bhgs", mean, keys)
        if cov is not None:
            kc = torch.einsum("bhsd,bhgde->bhgse", keys, cov.view(b, hkv, g, d, d))
            logits = logits + 0.5 * ctx.scaling**2 * (kc * keys[:, :, None]).sum(-1)
        sinks = self.token_rank(ctx) < self.n_sink  # [B, S]
        if ctx.visible is not None:
            sinks = sinks & ctx.visible
        unscored = sinks if ctx.visible is None else sinks | ~ctx.visible
        logits = logits.masked_fill(unscored[:, None, None, :], float("-inf"))
        # a row of sinks and pads only has nothing to normalise (NaN): those tokens are kept or dropped anyway
        scores = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(2)  # [B, Hkv, S]
        if self.use_vnorm:
            scores = scores * ctx.values.float().norm(dim=-1)
        return scores + sinks[:, None, :] * FORCE_KEEP

    @staticmethod
    def token_rank(ctx: ScoreContext) -> Tensor:
        """[B, S] each stored slot's place among its row's real tokens (pads: -1 or repeats, masked anyway)."""
        if ctx.visible is None:
            return torch.arange(ctx.keys.shape[-2], device=ctx.keys.device).expand(ctx.keys.shape[0], -1)
        return ctx.visible.long().cumsum(-1) - 1
