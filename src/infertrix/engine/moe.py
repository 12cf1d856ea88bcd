"""Mixture-of-Experts layers on the engine: the attention half as the engine's ops, the MoE block as the model's module.

A sparse-MoE decoder layer (Mixtral, Qwen2-MoE, Qwen3-MoE) has the attention of a Mistral, Qwen2
or Qwen3 layer and, in place of one MLP, a block that routes each token to its top-k experts
(Qwen2-MoE adds a gated shared expert). The engine runs everything around the block as it runs a
dense layer: the input norm, the q/k/v projection (fused, any linear kind), per-head q/k norms,
rotary embedding, the KV append, grouped-query attention over the cache, o_proj and the residual
add fused with the post-attention norm. The block itself is called as the model's module on the
normed rows ``[B, T, C]``: the model's router, its experts (or :mod:`infertrix.moe`'s offloaded
ones, which are a swap of that module) and its shared expert, so routing stays the model's code.

What the block computes depends on the rows it is given as the module path's does: its router is
torch's ``F.linear`` over all the rows of the call, and float experts run torch's GEMM over the
rows routed to each. So an MoE model's logits are row-invariant in the attention half only;
``describe()`` says so (``moe_blocks``). Low-bit offloaded experts run the row-invariant W4A8 /
W8A8 kernels.

``infertrix.moe``'s prefetch hooks (on the decoder layer's output, or on the post-attention
norm's input; marked with ``_infertrix_engine_calls``) are called here where the module path would
call them, with the same tensors, so expert prefetch works on the engine too (:func:`known_hooks`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .skips import attention_only

_ops = torch.ops.infertrix

# the mark of hooks the engine calls itself on MoE layers (it runs no decoder layer or norm module there):
# forward hooks of the decoder layer, called with args () and the layer's output [B, T, C], and
# forward pre-hooks of the post-attention norm, called with (its input [B, T, C],); the engine
# ignores what they return, so a marked hook must return None
ENGINE_CALLS = "_infertrix_engine_calls"


def is_moe_block(mlp: nn.Module | None) -> bool:
    """A transformers 5 sparse-MoE block: a router ``gate`` and an ``experts`` module (fused, or
    infertrix.moe's offloaded swap of it), called as ``block(hidden [B, T, C]) -> [B, T, C]``."""
    return mlp is not None and getattr(mlp, "experts", None) is not None and getattr(mlp, "gate", None) is not None


def known_hooks(fn: object) -> bool:
    """Whether the engine calls hook ``fn`` itself (infertrix.moe's prefetch signals)."""
    return bool(getattr(fn, ENGINE_CALLS, False))


def _before(h1: Tensor, lp, batch: int) -> None:
    """The post-attention norm's pre-hooks, on its input ``h1`` [M, C]."""
    for hook in lp.norm_hooks():
        hook(lp.mid_module, (h1.view(batch, -1, h1.shape[-1]),))


def _after(h: Tensor, lp, batch: int) -> None:
    """The decoder layer's forward hooks, on its output ``h`` [M, C]."""
    for hook in lp.layer_hooks():
        hook(lp.layer_module, (), h.view(batch, -1, h.shape[-1]))


def _block(h1: Tensor, m: Tensor, lp, batch: int) -> Tensor:
    """The layer's MoE block on the normed rows ``m`` [M, C] (after the post-attention norm's
    pre-hooks saw its input ``h1``, as on the module path)."""
    _before(h1, lp, batch)
    return lp.mlp(m.view(batch, -1, m.shape[-1])).reshape(m.shape)


def moe_hooks(h: Tensor, lp, batch: int) -> None:
    """An MoE layer whose block a skip plan skips: its norm's and decoder layer's hooks see ``h``
    (h + attention), as on the module path, where the layer still runs around a pass-through."""
    _before(h, lp, batch)
    _after(h, lp, batch)


def moe_layer(h: Tensor, a: Tensor, lp, kbuf: Tensor, vbuf: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
              start: Tensor, index: int, batch: int, probs: Tensor | None = None, queries: Tensor | None = None,
              tree: Tensor | None = None, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One MoE decoder layer: h1 = h + attention(a) (the engine's ops; ``probs`` / ``queries`` /
    ``tree`` / ``hidden`` as ``engine_layer``'s), then h1 + block(mid_norm(h1)) and the next norm."""
    t, f = lp.tensors, lp.floats
    h1, m = attention_only(h, a, lp, kbuf, vbuf, cos, sin, positions, start, index, batch, tree,
                           norm=(t[0], f[1]), probs=probs, queries=queries, hidden=hidden)
    out = _ops.add_rms_norm(_block(h1, m, lp, batch), h1, t[1], f[2])
    _after(out[0], lp, batch)
    return out


def moe_mlp_only(h: Tensor, lp, batch: int) -> tuple[Tensor, Tensor]:
    """An MoE layer whose attention a skip plan skips: h + block(mid_norm(h)), and the next norm."""
    t, f = lp.tensors, lp.floats
    out = _ops.add_rms_norm(_block(h, _ops.rms_norm(h, t[0], f[1]), lp, batch), h, t[1], f[2])
    _after(out[0], lp, batch)
    return out

