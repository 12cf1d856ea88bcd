"""A lean forward pass for a Llama-family draft model drafting one row: the same arithmetic as
transformers' modules, without their per-call machinery.

A draft model's forward is run once per draft token, and a small draft's compute is so little
that transformers' per-layer Python (mask and position bookkeeping, cache objects, module hooks,
the attention-interface dispatch) costs more than its weights: SmolLM2's W4A8 self-draft spent
~3.3 ms of a 9.9 ms step in its matrix kernels (1 thread). The Medusa / EAGLE / SWIFT research
code gets its speed partly the same way, by running the draft outside the framework's generic
path. :class:`LeanDecoder` runs the decoder of a supported model (``llama``, ``mistral`` without
a sliding window, ``qwen2``: RMSNorm, rotary attention with grouped heads, a SiLU-gated MLP) for
one sequence straight from the model's own modules and tensors:

- the projections are the model's own modules; W8A8 or W4A8 ``q``/``k``/``v`` and
  ``gate``/``up`` projections are fused into one quantized linear each (one activation
  quantization and one kernel call instead of three or two), whose codes and channel scales the
  original modules then *view* (no second copy of the weights);
- its KV cache is one preallocated buffer per layer (grown by doubling), and rolling back is
  setting the length;
- the rotary tables are computed once, by the model's own rotary module, for all positions.

Only the draft uses it, so it costs nothing in exactness: every drafted token is still verified
by the target. It is checked against the model's own forward in the tests (equal to float32
rounding). Unsupported models (other architectures, sliding windows, per-head norms) and
batches of several rows keep the generic path (:class:`~.ragged.RaggedKV`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.model import decoder_layers, llama_shape_problem, model_type, norm_eps, text_config

SUPPORTED = ("llama", "mistral", "qwen2")


def lean_supported(model: nn.Module) -> str | None:
    """None when :class:`LeanDecoder` can run ``model``, else why not."""
    if why := llama_shape_problem(model, SUPPORTED, "lean drafting supports"):
        return why
    cfg = text_config(model)
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", model_type(model) == "mistral"):
        return "sliding-window attention"
    layers, inner = decoder_layers(model), model.model
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return "a decoder layer without self_attn / mlp"
        if any(getattr(attn, n, None) is None for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm")):
            return "per-head query/key norms"
        if any(getattr(mlp, n, None) is None for n in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP without gate/up/down projections"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if norm is None or getattr(norm, "weight", None) is None or norm_eps(norm) is None:
                return "a layer norm that is not an RMSNorm with a weight"
    if norm_eps(inner.norm) is None:
        return "a final norm that is not an RMSNorm"
    return None


def _rms_norm(x: Tensor, norm: nn.Module, eps: float) -> Tensor:
    # transformers' RMSNorm: normalise in float32, scale by the weight in the input dtype
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def fuse_quantized(mods: list[nn.Module]) -> nn.Module | None:
    """One quantized linear computing ``cat([m(x) for m in mods], -1)``, whose weights the given
    modules then view (so nothing is duplicated), when they are quantized modules of one kind that
    can fuse (:meth:`~infertrix.quant.QuantizedLinear.fuse`: W8A8, and W4A8 of one group size and
    scheme in whole 16-row panels). Each output row is computed exactly as by its own module
    (activations are quantized per token, weights per output channel). None when they cannot be fused."""
    from ..quant.linear_base import QuantizedLinear

    first = mods[0]
    return type(first).fuse(mods) if isinstance(first, QuantizedLinear) else None


class _Layer:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.in_eps, self.post_eps = norm_eps(self.in_norm), norm_eps(self.post_norm)
        self.qkv = fuse_quantized([attn.q_proj, attn.k_proj, attn.v_proj])
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_up = fuse_quantized([mlp.gate_proj, mlp.up_proj])
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))


class LeanDecoder:
    """One sequence through ``model`` with its own KV cache (see the module docstring).

    ``extend(tokens)`` appends tokens and returns the logits ``[V]`` after the last one;
    ``truncate(n)`` keeps the first ``n`` cached tokens; ``length`` is how many are cached."""

    def __init__(self, model: nn.Module, capacity: int = 256):
        why = lean_supported(model)
        if why is not None:
            raise ValueError(f"LeanDecoder does not support this model: {why}")
        cfg = text_config(model)
        self.inner = model.model
        self.layers = [_Layer(layer) for layer in decoder_layers(model)]
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.final_eps = norm_eps(self.inner.norm)
        self.lm_head = model.get_output_embeddings()
        self.length = 0
        p = next(model.parameters())
        self.dtype, self.device = self.inner.embed_tokens.weight.dtype, p.device
        self.capacity = 0
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self._grow(capacity)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity, 64)
        shape = (1, self.kv_heads, cap, self.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        ks = [torch.zeros(shape, **kw) for _ in self.layers]
        vs = [torch.zeros(shape, **kw) for _ in self.layers]
        for old, new in zip(self.k + self.v, ks + vs, strict=False):
            new[:, :, : self.length].copy_(old[:, :, : self.length])
        self.k, self.v = ks, vs
        ids = torch.arange(cap, device=self.device)[None]
        cos, sin = self.inner.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), ids)
        half = self.head_dim // 2
        self.cos = cos[0]  # [cap, D]
        # rotate_half(x) * sin == cat(x2, x1) * sin_signed, sin_signed = cat(-sin[:half], sin[half:])
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.capacity = cap

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"LeanDecoder.truncate({n}) with {self.length} tokens cached")
        self.length = n

    @torch.no_grad()
    def extend(self, tokens: list[int]) -> Tensor:
        w = len(tokens)
        if w == 0:
            raise ValueError("LeanDecoder.extend needs at least one token")
        n = self.length
        if n + w > self.capacity:
            self._grow(n + w)
        heads, kvh, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        h = self.inner.embed_tokens(ids)  # [1, W, C]
        cos, sin = self.cos[n : n + w], self.sin[n : n + w]
        mask = None
        if w > 1:  # causal over the window, everything cached before it visible
            mask = torch.ones((w, n + w), dtype=torch.bool, device=self.device).tril(n)
        for i, ly in enumerate(self.layers):
            a = _rms_norm(h, ly.in_norm, ly.in_eps)
            if ly.qkv is not None:
                qkv = ly.qkv(a).view(1, w, heads + 2 * kvh, d).transpose(1, 2)
                qk, v = qkv[:, : heads + kvh], qkv[:, heads + kvh :]
            else:
                qk = torch.cat([ly.q(a).view(1, w, heads, d), ly.k(a).view(1, w, kvh, d)], dim=2).transpose(1, 2)
                v = ly.v(a).view(1, w, kvh, d).transpose(1, 2)
            qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin
            kb, vb = self.k[i], self.v[i]
            kb[:, :, n : n + w] = qk[:, heads:]
            vb[:, :, n : n + w] = v
            o = F.scaled_dot_product_attention(
                qk[:, :heads], kb[:, :, : n + w], vb[:, :, : n + w], attn_mask=mask, scale=ly.scaling,
                enable_gqa=heads != kvh,
            )
            h = h + ly.o(o.transpose(1, 2).reshape(1, w, heads * d))
            a = _rms_norm(h, ly.post_norm, ly.post_eps)
            if ly.gate_up is not None:
                g, u = ly.gate_up(a).chunk(2, dim=-1)
            else:
                g, u = ly.gate(a), ly.up(a)
            h = h + ly.down(F.silu(g) * u)
        self.length = n + w
        last = _rms_norm(h[:, -1:], self.inner.norm, self.final_eps)
        return self.lm_head(last)[0, 0]
