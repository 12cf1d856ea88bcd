"""``infertrix_sdpa``: transformers' sdpa attention without copying grouped keys and values for a
masked window of several queries.

On a grouped-query model (SmolLM2: 9 query heads share 3 key/value heads) transformers' sdpa
function expands the cached keys and values to one copy per query head (``repeat_kv``) whenever
it passes a mask for more than one query position, which is every speculative verification
forward of a batch with padding or with rows of unequal progress. That is two fresh tensors of
``groups x`` the layer's cache per layer per step: at batch 4 with 400 cached tokens, 225 MB
written per forward on SmolLM2, and the largest cost of a verification after the weights. One
query position already avoids it (transformers folds the heads of a group into the query
length, ``pack_gqa``); this does the same for a window of ``W`` queries: the query heads of a
group become ``groups * W`` query rows of their key/value head, and the mask, shared by the
heads, is repeated once per head of the group. Each query row still sees exactly its own mask
row, keys and values, and the output is unpacked to the usual layout.

Every other call (no mask, one query, dropout, soft-capping, sinks, a position bias, a per-head
mask, no grouping) goes to transformers' own ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .model import text_config

SDPA_ATTENTION = "infertrix_sdpa"


def packable(module: nn.Module, query: Tensor, attention_mask: Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Whether a call can take the packed path: grouped heads, a window of queries, one mask for
    all heads, and nothing the plain formula does not model."""
    groups = getattr(module, "num_key_value_groups", 1)
    return (
        groups > 1
        and query.shape[2] > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and not dropout
        and not kwargs.get("softcap")
        and not kwargs.get("output_attentions")
        and all(kwargs.get(name) is None for name in ("position_bias", "s_aux", "sinks"))
    )


def packed_gqa_sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scaling: float | None) -> Tensor:
    """Attention of ``query [B, H, W, D]`` over ``key``/``value [B, Hkv, L, D]`` with one mask
    ``[B or 1, 1, W, L]`` for all heads, without expanding the keys and values; returns
    ``[B, W, H, Dv]`` (transformers' layout)."""
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * width, dim)  # head g*groups + r, query w -> row r*W + w
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask.repeat(1, 1, groups, 1), scale=scaling)
    return out.reshape(batch, heads, width, value.shape[-1]).transpose(1, 2).contiguous()


def sdpa_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function ``"infertrix_sdpa"`` (see the module docstring)."""
    if packable(module, query, attention_mask, dropout, kwargs):
        return packed_gqa_sdpa(query, key, value, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(SDPA_ATTENTION, sdpa_forward)
AttentionMaskInterface.register(SDPA_ATTENTION, sdpa_mask)


def attention_implementation(model: nn.Module) -> str | None:
    return getattr(text_config(model), "_attn_implementation", None)


def use_packed_sdpa(model: nn.Module) -> Callable[[], None]:
    """Switch an sdpa model to ``infertrix_sdpa``; returns the undo (a no-op when the model runs
    another attention implementation, which is then left alone)."""
    if attention_implementation(model) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return lambda: None
    model.set_attn_implementation(SDPA_ATTENTION)

    def undo() -> None:
        if attention_implementation(model) == SDPA_ATTENTION:
            model.set_attn_implementation("sdpa")

    return undo


__all__ = ["SDPA_ATTENTION", "packed_gqa_sdpa", "sdpa_forward", "use_packed_sdpa"]
