"""The engine's forward: a whole decoder stack as a short loop over the engine's ops.

One ``infertrix::engine_layer`` call per decoder layer (C++: the q/k/v projection, fused into
one call on quantized models, optional per-head q/k norms, rotary embedding from tables, the KV
append, grouped-query attention over the cache, o_proj, the residual add fused with the next
norm, the gate/up projection, the SiLU-gated product and down_proj), then the LM head on the kept
positions only: about 35 dispatches per token on a 30-layer model instead of transformers'
thousands of small ops.

Every step is row-invariant (``ops/engine.py``, ``linears.py``), so a token's logits are the same
bits in a 1-token step, inside a window of tokens, as a row of a left-padded batch, in the prompt,
and at any thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.model import decoder_layers, text_config
from . import linears
from .cache import begin, commit
from .kivi import kivi_step, reads_codes
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
        layers = list(decoder_layers(model))
        nexts = [_norm(layer.input_layernorm) for layer in layers[1:]] + [_norm(inner.norm)]
        self.layers = [layer_plan(model, layer, nxt) for layer, nxt in zip(layers, nexts, strict=True)]
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
    def forward(self, ids: Tensor, pads: Tensor, positions: Tensor, cache, keep: int | Tensor) -> Tensor:
        """Logits [B, kept, V] for tokens ``ids`` [B, T] appended to ``cache`` (an ``EngineCache`` or
        a storage ``cache.storage_problem`` accepts); row b has ``pads[b]`` left-padding tokens, its
        tokens sit at rotary ``positions`` [B, T]."""
        b, t = ids.shape
        kv, d = self.kv_heads, self.head_dim
        x = self.embed(ids).reshape(b * t, -1)
        self._tables(int(positions.max()) + 1, x)
        cos, sin = self.cos_table, self.sin_table
        a = _ops.rms_norm(x, self.layers[0].in_norm, self.layers[0].in_eps)
        h = x
        for store, lp in zip(cache.layers, self.layers, strict=True):
            if reads_codes(store):  # KIVI codes: one token per row (cache.storage_problem)
                h, a = kivi_step(h, a, lp, store, cos, sin, positions, pads, b)
                continue
            kbuf, vbuf, index, start = begin(store, x, b, kv, t, d, pads)
            h, a = _ops.engine_layer(h, a, lp.tensors, lp.ints, lp.floats, kbuf, vbuf, cos, sin, positions, start,
                                     index, b)
            commit(store, t)
        a = a.view(b, t, -1)
        if isinstance(keep, Tensor):
            a = a[:, keep]
        elif keep:
            a = a[:, -keep:]
        kept = a.shape[1]
        return self.head(a.reshape(b * kept, -1)).view(b, kept, -1)
