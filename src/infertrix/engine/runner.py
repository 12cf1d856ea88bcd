"""The engine's forward: a whole decoder stack as a short loop over the engine's ops.

Per layer: RMSNorm, the q/k/v projection (one fused call on quantized models), optional per-head
q/k norms, rotary embedding from tables, the KV append, grouped-query attention over the cache,
o_proj, the residual add fused with the next norm, the gate/up projection, the SiLU-gated
product and down_proj; then the final norm and the LM head on the kept positions only. About a
dozen dispatches per layer instead of transformers' hundreds of small ops.

Every step is row-invariant (``ops/engine.py``, ``linears.py``), so a token's logits are the same
bits in a 1-token step, inside a window of tokens, as a row of a left-padded batch, in the prompt,
and at any thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.model import decoder_layers, text_config
from . import linears
from .cache import EngineCache
from .plan import _norm, fingerprint, layer_plan

_ops = torch.ops.infertrix
TABLE_BLOCK = 256  # rotary table positions computed per call (fixed, so a position's values never change)


class Runner:
    """The plan of one model and its forward (built once, rebuilt when a module is swapped)."""

    def __init__(self, model: nn.Module):
        cfg = text_config(model)
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = [layer_plan(model, i, layer) for i, layer in enumerate(decoder_layers(model))]
        self.final = _norm(inner.norm)
        self.head = linears.linear(model.get_output_embeddings())
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.cos: list[Tensor] = []
        self.sin: list[Tensor] = []
        self.cos_table = self.sin_table = None
        self.fingerprint = fingerprint(model)

    def _tables(self, need: int, like: Tensor) -> None:
        """cos/sin for positions [0, need), by the model's own rotary module, TABLE_BLOCK at a time."""
        have = len(self.cos) * TABLE_BLOCK
        if have >= need:
            return
        while have < need:
            ids = torch.arange(have, have + TABLE_BLOCK, device=like.device)[None]
            cos, sin = self.rotary(like, ids)
            self.cos.append(cos[0].float())
            self.sin.append(sin[0].float())
            have += TABLE_BLOCK
        self.cos_table = torch.cat(self.cos).contiguous()
        self.sin_table = torch.cat(self.sin).contiguous()

    @torch.no_grad()
    def forward(self, ids: Tensor, start: Tensor, positions: Tensor, cache: EngineCache, keep: int | Tensor) -> Tensor:
        """Logits [B, kept, V] for tokens ``ids`` [B, T] appended to ``cache``; row b's valid slots
        begin at ``start[b]`` (left padding), its tokens sit at rotary ``positions`` [B, T]."""
        b, t = ids.shape
        h_, kv, d = self.heads, self.kv_heads, self.head_dim
        index = cache.layers[0].length
        need = index + t
        x = self.embed(ids).reshape(b * t, -1)
        self._tables(int(positions.max()) + 1, x)
        cos, sin = self.cos_table, self.sin_table
        a = _ops.rms_norm(x, self.layers[0].in_norm, self.layers[0].in_eps)
        h = x
        for i, lp in enumerate(self.layers):
            store = cache.layers[i]
            store.reserve(x, b, kv, need, d)
            if lp.qkv is not None:
                qkv = lp.qkv(a).view(b, t, h_ + 2 * kv, d)
                q, k, v = qkv[:, :, :h_], qkv[:, :, h_ : h_ + kv], qkv[:, :, h_ + kv :]
            else:
                q, k, v = lp.q(a).view(b, t, h_, d), lp.k(a).view(b, t, kv, d), lp.v(a).view(b, t, kv, d)
            if lp.q_norm is not None:
                q = _ops.rms_norm(q, *lp.q_norm)
                k = _ops.rms_norm(k, *lp.k_norm)
                q, k = _ops.rope(q, cos, sin, positions), _ops.rope(k, cos, sin, positions)
            elif lp.qkv is not None:
                qk = _ops.rope(qkv[:, :, : h_ + kv], cos, sin, positions)
                q, k = qk[:, :, :h_], qk[:, :, h_:]
            else:
                q, k = _ops.rope(q, cos, sin, positions), _ops.rope(k, cos, sin, positions)
            _ops.kv_append(store.kbuf, store.vbuf, k, v, index)
            store.length = need
            o = _ops.gqa_attention(q, store.kbuf, store.vbuf, start, index, lp.scaling, lp.window)
            h, a = _ops.add_rms_norm(lp.o(o.view(b * t, h_ * d)), h, lp.post_norm, lp.post_eps)
            if lp.gate_up is not None:
                gu = lp.gate_up(a)
            else:
                gu = torch.cat([lp.gate(a), lp.up(a)], dim=-1)
            m = lp.down(_ops.silu_mul(gu))
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            w, eps = (nxt.in_norm, nxt.in_eps) if nxt is not None else self.final
            h, a = _ops.add_rms_norm(m, h, w, eps)
        a = a.view(b, t, -1)
        if isinstance(keep, Tensor):
            a = a[:, keep]
        elif keep:
            a = a[:, -keep:]
        kept = a.shape[1]
        return self.head(a.reshape(b * kept, -1)).view(b, kept, -1)
