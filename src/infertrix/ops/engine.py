"""The decode engine's ops (``infertrix.engine``): RMSNorm, the SiLU- and GELU(tanh)-gated
products, rotary embedding from tables, KV append into preallocated storage and grouped-query
attention.

Each op's body is its PyTorch reference; ``csrc/cpu/engine_ops.cpp`` registers the CPU kernels
(AVX-512 / AVX2 / scalar). The kernels' guarantee is *invariance*: every reduction runs in an order
fixed by the model's shapes, so a row's result is the same bits whatever the batch, the window of
tokens or the thread count. Attention splits a query's keys into blocks of ``KV_BLOCK`` slots
counted from the row's first valid slot and combines them in block order (the split-KV scheme of
Flash-Decoding, Dao et al. 2023, with split points that never move). Kernels equal the references
to float32 rounding; ``rope`` and ``kv_append`` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kivi_attention import kivi_decode_attention
from .registry import register_op

KV_BLOCK = 64  # keys per attention block (csrc/cpu/engine_ops.cpp kKvBlock)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension, in float32 (transformers' RMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + residual, rms_norm(x + residual)): a decoder layer's residual add and the next norm."""
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up = cat(gate, up) along the last dimension (the SwiGLU product)."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def gelu_tanh_mul_reference(gate_up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up for gate_up = cat(gate, up) (Gemma's ``gelu_pytorch_tanh`` gated MLP)."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin for x [B, T, heads, D], tables [P, D] gathered at positions [B, T]."""
    c, s = cos[positions][:, :, None], sin[positions][:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def kv_append_reference(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, index: int) -> None:
    """Write k, v [B, T, kv_heads, D] into cache slots [index, index + T) of [B, kv_heads, capacity, D]."""
    t = k.shape[1]
    if index < 0 or index + t > k_cache.shape[2]:
        raise ValueError(f"kv_append: slots [{index}, {index + t}) outside capacity {k_cache.shape[2]}")
    k_cache[:, :, index : index + t] = k.transpose(1, 2)
    v_cache[:, :, index : index + t] = v.transpose(1, 2)


def tree_paths(tree: Tensor) -> tuple[Tensor, Tensor]:
    """(depth [B, T], ancestors-or-self [B, T, T] bool) of a token tree given by each new slot's
    parent slot (``tree`` int64 [B, T], -1: none; a parent precedes its child)."""
    b, t = tree.shape
    if bool(((tree < -1) | (tree >= torch.arange(t, device=tree.device))).any()):
        raise ValueError("gqa_attention: a tree parent must be an earlier new slot or -1")
    anc = torch.eye(t, dtype=torch.bool, device=tree.device).repeat(b, 1, 1)
    depth = torch.zeros(b, t, dtype=torch.long, device=tree.device)
    rows = torch.arange(b, device=tree.device)
    for i in range(t):
        p = tree[:, i]
        has = p >= 0
        anc[has, i] |= anc[rows[has], p[has]]
        depth[has, i] = depth[rows[has], p[has]] + 1
    return depth, anc


def gqa_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, index: int, scale: float, window: int,
    probs: Tensor | None = None, tree: Tensor | None = None, hidden: Tensor | None = None,
) -> Tensor:
    """Grouped-query attention of q [B, T, H, D] over cache slots [start[b], index + t] of row b.

    Query t of row b sits in slot ``index + t`` (causal); ``window > 0`` also hides slots at or
    before ``index + t - window`` (sliding-window attention). A query with no visible slot (a
    padding token) gets zeros. Returns [B, T, H, D].

    ``probs`` (optional, [B, H, T, index + T] float32): receives each query's softmax over the
    slots, 0 where hidden, for the KV policies that score by attention (H2O, SnapKV, TOVA...);
    a forward that passes none pays nothing for it.

    ``tree`` (optional, int64 [B, T]; no ``probs`` with it): token-tree verification (SpecInfer,
    Miao et al. 2024, arXiv:2305.09781). ``tree[b, t]`` is the new slot of query t's parent (-1:
    none); query t sees the cache before ``index`` and its ancestors-or-self among the new slots,
    and sits at logical slot ``index + depth`` (what the window counts), as the same token would
    in a linear window of its path.

    ``hidden`` (optional, bool [B, kv_heads, S], S <= index): slots below S that a KV head does not
    attend (head-wise KV budgets: AdaKV, Feng et al. 2024, arXiv:2407.11550)."""
    b, t, h, d = q.shape
    kvh = k_cache.shape[1]
    n = index + t
    k = k_cache[:, :, :n].repeat_interleave(h // kvh, dim=1).float()
    v = v_cache[:, :, :n].repeat_interleave(h // kvh, dim=1).float()
    scores = torch.einsum("bthd,bhnd->bhtn", q.float(), k) * scale
    j = torch.arange(n, device=q.device)
    if tree is None:
        i = (index + torch.arange(t, device=q.device))[None].expand(b, t)
        logical = j[None, None, :].expand(b, t, n)
        visible = (j[None, None, :] >= start[:, None, None]) & (logical <= i[:, :, None])
    else:
        if probs is not None:
            raise ValueError("gqa_attention: a token tree takes no probs")
        if bool((start > index).any()):
            raise ValueError("gqa_attention: a token tree needs each row to start in the cache")
        depth, anc = tree_paths(tree)
        i = index + depth
        # a new slot's logical position is index + its depth; the cache's slots are their own
        logical = torch.cat([j[:index][None, None].expand(b, t, index), (index + depth)[:, None, :].expand(b, t, t)], -1)
        visible = torch.cat([(j[None, None, :index] >= start[:, None, None]).expand(b, t, index), anc], -1)
    if window > 0:
        visible = visible & (logical > i[:, :, None] - window)
    visible = visible[:, None]
    if hidden is not None:
        if hidden.dim() != 3 or hidden.shape[:2] != (b, kvh) or hidden.shape[2] > index:
            raise ValueError(f"gqa_attention: hidden must be [{b}, {kvh}, S <= {index}], got {tuple(hidden.shape)}")
        heads = hidden.repeat_interleave(h // kvh, dim=1)[:, :, None, :]  # [B, H, 1, S]
        visible = torch.cat([visible[..., : hidden.shape[2]] & ~heads, visible[..., hidden.shape[2] :].expand(
            -1, h, -1, -1)], -1)
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if probs is not None:
        probs.copy_(p)
    return torch.einsum("bhtn,bhnd->bthd", p, v).to(q.dtype)


rms_norm = torch.library.custom_op("infertrix::rms_norm", mutates_args=())(rms_norm_reference)
add_rms_norm = torch.library.custom_op("infertrix::add_rms_norm", mutates_args=())(add_rms_norm_reference)
silu_mul = torch.library.custom_op("infertrix::silu_mul", mutates_args=())(silu_mul_reference)
gelu_tanh_mul = torch.library.custom_op("infertrix::gelu_tanh_mul", mutates_args=())(gelu_tanh_mul_reference)
rope = torch.library.custom_op("infertrix::rope", mutates_args=())(rope_reference)
kv_append = torch.library.custom_op("infertrix::kv_append", mutates_args=("k_cache", "v_cache"))(kv_append_reference)
gqa_attention = torch.library.custom_op("infertrix::gqa_attention", mutates_args=("probs",))(gqa_attention_reference)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, dtype=torch.float32)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)


@silu_mul.register_fake
@gelu_tanh_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@rope.register_fake
def _(x, cos, sin, positions):
    return x.new_empty(x.shape)


@kv_append.register_fake
def _(k_cache, v_cache, k, v, index):
    return None


@gqa_attention.register_fake
def _(q, k_cache, v_cache, start, index, scale, window, probs=None, tree=None, hidden=None):
    return q.new_empty(q.shape)


LINEAR_KINDS = {"fp32": 0, "w4a8": 1, "w8a8": 2, "w4a16": 3, "w8a8_flat": 4}
SKINNY_MAX_ROWS = 32  # ops/skinny_linear.py MAX_ROWS
LAYER_INTS, LAYER_TENSORS = 7, 6  # engine_layer's leading ints / tensors, before the linear slots
SLOT_TENSORS = 5  # tensors per linear slot


def w4a16(x: Tensor, qweight: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    """``W4A16Linear``'s arithmetic on float32 rows x [M, K]: torch's CPU int4 kernel in bfloat16
    (which computes each row on its own), back to float32, plus the bias."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), qweight, group_size, scales_and_zeros)
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def _linear(kind: int, in_features: int, group_size: int, t: list[Tensor | None], x: Tensor) -> Tensor:
    """One linear slot of the packed layout (see engine_layer_reference); row-invariant."""
    ops = torch.ops.infertrix
    if kind == 1:
        return ops.w4a8_linear(x, t[0], t[1], t[2], t[3], in_features, group_size, t[4])
    if kind == 2:
        return ops.w8a8_linear(x, t[0], t[1], t[4])
    if kind == 3:
        return w4a16(x, t[0], t[1], group_size, t[4])
    if kind == 4:
        return ops.w8a8_flat_linear(x, t[0], t[1], t[4])
    # float32: the skinny kernel in chunks it keeps (torch's GEMM above them depends on the batch)
    return torch.cat([ops.skinny_linear(x[i : i + SKINNY_MAX_ROWS], t[0], t[4])
                      for i in range(0, x.shape[0], SKINNY_MAX_ROWS)])


def _group(tensors: list[Tensor | None], ints: list[int], first: int, n: int, x: Tensor) -> Tensor:
    outs = []
    for s in range(first, first + n):
        i, t = LAYER_INTS + 3 * s, LAYER_TENSORS + SLOT_TENSORS * s
        outs.append(_linear(*ints[i : i + 3], tensors[t : t + SLOT_TENSORS], x))
    return outs[0] if n == 1 else torch.cat(outs, dim=-1)


def engine_layer_reference(
    h: Tensor, a: Tensor, tensors: list[Tensor | None], ints: list[int], floats: list[float], k_cache: Tensor,
    v_cache: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, start: Tensor, index: int, batch: int,
    probs: Tensor | None = None, queries: Tensor | None = None, tree: Tensor | None = None,
    hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Llama- or Gemma-3-style decoder layer on M = batch x T token rows: returns
    (h', next_norm(h')).

    ``h`` is the residual stream [M, C] and ``a`` its input norm. Packed layout:
    ``tensors`` = [mlp_norm, next_norm, q_norm, k_norm, attn_out_norm, mlp_out_norm] (the last
    four may be None; Gemma 3 normalises the attention and MLP outputs before each residual add)
    then ``SLOT_TENSORS`` (five) per linear slot, unused ones None (fp32: weight, -, -, -, bias;
    w4a8: qweight, scale, group_scale, zero, bias; w8a8: qweight, scale, -, -, bias; w4a16: qweight,
    scales_and_zeros, -, -, bias; w8a8_flat: qweight, scales, -, -, bias); the slots are the q/k/v
    group (``n_qkv`` slots whose outputs are concatenated), o_proj, the gate/up group (``n_gu``
    slots), down_proj. ``ints`` = [heads, kv_heads, head_dim, n_qkv, n_gu, window, gelu] (gelu:
    1 for the gelu_pytorch_tanh MLP, 0 for SiLU) then (kind, in_features, group_size) per slot
    (kinds: ``LINEAR_KINDS``); ``floats`` = [scaling, mlp_eps, next_eps, q_norm_eps, k_norm_eps,
    attn_out_eps, mlp_out_eps]. New keys and values go to cache slots [index, index + T).

    Optional outputs for the KV policies that score by attention: ``probs`` [B, H, T, index + T]
    (``gqa_attention``'s), ``queries`` [B, T, H, D] (the post-rotary queries, which SnapKV-style
    policies buffer between decode-time compressions). ``tree``: a token tree over the new tokens
    (``gqa_attention``'s), for verifying draft trees; ``hidden``: slots hidden per KV head
    (``gqa_attention``'s)."""
    _check_layout(tensors, ints, "engine_layer")
    heads, d, window = ints[0], ints[2], ints[5]
    m = a.shape[0]
    q, k, v = _queries_keys_values(a, tensors, ints, floats, cos, sin, positions, batch)
    kv_append(k_cache, v_cache, k, v, index)
    if queries is not None:
        queries.copy_(q)
    o = gqa_attention(q, k_cache, v_cache, start, index, floats[0], window, probs, tree, hidden)
    return _layer_tail(h, o.reshape(m, heads * d), tensors, ints, floats)


def _check_layout(tensors: list[Tensor | None], ints: list[int], name: str) -> None:
    slots = ints[3] + ints[4] + 2
    if len(ints) != LAYER_INTS + 3 * slots or len(tensors) != LAYER_TENSORS + SLOT_TENSORS * slots:
        raise ValueError(f"{name}: {slots} linear slots need {LAYER_INTS + 3 * slots} ints and "
                         f"{LAYER_TENSORS + SLOT_TENSORS * slots} tensors")


def _queries_keys_values(a: Tensor, tensors: list[Tensor | None], ints: list[int], floats: list[float], cos: Tensor,
                         sin: Tensor, positions: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """A layer's q, k (q/k norms, rotary) and v [batch, T, heads, D] from its normed input ``a``."""
    heads, kvh, d, n_qkv = ints[:4]
    qkv = _group(tensors, ints, 0, n_qkv, a).view(batch, a.shape[0] // batch, heads + 2 * kvh, d)
    if tensors[2] is not None:
        q = rope(rms_norm(qkv[:, :, :heads], tensors[2], floats[3]), cos, sin, positions)
        k = rope(rms_norm(qkv[:, :, heads : heads + kvh], tensors[3], floats[4]), cos, sin, positions)
    else:
        qk = rope(qkv[:, :, : heads + kvh], cos, sin, positions)
        q, k = qk[:, :, :heads], qk[:, :, heads:]
    return q, k, qkv[:, :, heads + kvh :]


def _attention_out(h: Tensor, o: Tensor, tensors: list[Tensor | None], ints: list[int], floats: list[float],
                   norm: tuple[Tensor, float]) -> tuple[Tensor, Tensor]:
    """o_proj of the attention ``o`` [M, heads * D] (and Gemma 3's output norm), the residual add to
    ``h``, and ``norm`` (weight, eps) of the sum: (h', norm(h'))."""
    attn = _group(tensors, ints, ints[3], 1, o)
    if tensors[4] is not None:
        attn = rms_norm(attn, tensors[4], floats[5])
    return add_rms_norm(attn, h, *norm)


def _mlp_out(h: Tensor, a: Tensor, tensors: list[Tensor | None], ints: list[int],
             floats: list[float]) -> tuple[Tensor, Tensor]:
    """The gated MLP of the normed ``a`` (and Gemma 3's output norm), the residual add to ``h``, and
    the next norm of the sum: (h', next_norm(h'))."""
    n_qkv, n_gu, gelu = ints[3], ints[4], ints[6]
    gate_up = _group(tensors, ints, n_qkv + 1, n_gu, a)
    mlp = _group(tensors, ints, n_qkv + 1 + n_gu, 1, gelu_tanh_mul(gate_up) if gelu else silu_mul(gate_up))
    if tensors[5] is not None:
        mlp = rms_norm(mlp, tensors[5], floats[6])
    return add_rms_norm(mlp, h, tensors[1], floats[2])


def _layer_tail(h: Tensor, o: Tensor, tensors: list[Tensor | None], ints: list[int],
                floats: list[float]) -> tuple[Tensor, Tensor]:
    """A layer after its attention ``o`` [M, heads * D]: :func:`_attention_out` with the MLP's norm,
    then :func:`_mlp_out`: (h', next_norm(h'))."""
    h2, a2 = _attention_out(h, o, tensors, ints, floats, (tensors[0], floats[1]))
    return _mlp_out(h2, a2, tensors, ints, floats)


def engine_kivi_layer_reference(
    h: Tensor, a: Tensor, tensors: list[Tensor | None], ints: list[int], floats: list[float], k_cache: Tensor,
    v_cache: Tensor, length: int, codes: list[Tensor], mask: Tensor | None, bits: int, cos: Tensor, sin: Tensor,
    positions: Tensor, index: int, batch: int,
) -> tuple[Tensor, Tensor]:
    """``engine_layer`` for one new token per row of a layer whose older keys and values are KIVI
    codes (Liu et al. 2024, https://arxiv.org/abs/2402.02750): the new key and value go to slot
    ``index`` of the full-precision residual buffers ``k_cache`` / ``v_cache``, and the attention
    reads ``codes`` (key codes, scale, zero, value codes, scale, zero) then the residual's first
    ``length`` slots in one pass (``kivi_decode_attention``, with its additive ``mask`` and
    ``bits``). Packed layout as ``engine_layer``'s."""
    _check_layout(tensors, ints, "engine_kivi_layer")
    if len(codes) != 6 or a.shape[0] != batch or not 0 <= index < length <= k_cache.shape[2]:
        raise ValueError(f"engine_kivi_layer: 6 code tensors, one new token per row and 0 <= index < length <= "
                         f"the buffers' {k_cache.shape[2]} slots expected, got {len(codes)} code tensors, "
                         f"{a.shape[0]} rows for {batch}, index {index}, length {length}")
    heads, d = ints[0], ints[2]
    q, k, v = _queries_keys_values(a, tensors, ints, floats, cos, sin, positions, batch)
    kv_append(k_cache, v_cache, k, v, index)
    o = kivi_decode_attention(q[:, 0].contiguous(), *codes, k_cache[:, :, :length], v_cache[:, :, :length], mask,
                              bits, floats[0])
    return _layer_tail(h, o.reshape(batch, heads * d), tensors, ints, floats)


engine_layer = torch.library.custom_op(
    "infertrix::engine_layer", mutates_args=("k_cache", "v_cache", "probs", "queries"),
    schema="(Tensor h, Tensor a, Tensor?[] tensors, int[] ints, float[] floats, Tensor(a!) k_cache, "
           "Tensor(b!) v_cache, Tensor cos, Tensor sin, Tensor positions, Tensor start, int index, int batch, "
           "Tensor(c!)? probs=None, Tensor(d!)? queries=None, Tensor? tree=None, Tensor? hidden=None) -> (Tensor, Tensor)",
)(engine_layer_reference)


@engine_layer.register_fake
def _(h, a, tensors, ints, floats, k_cache, v_cache, cos, sin, positions, start, index, batch, probs=None,
      queries=None, tree=None, hidden=None):
    return torch.empty_like(h), torch.empty_like(a)


engine_kivi_layer = torch.library.custom_op(
    "infertrix::engine_kivi_layer", mutates_args=("k_cache", "v_cache"),
    schema="(Tensor h, Tensor a, Tensor?[] tensors, int[] ints, float[] floats, Tensor(a!) k_cache, "
           "Tensor(b!) v_cache, int length, Tensor[] codes, Tensor? mask, int bits, Tensor cos, Tensor sin, "
           "Tensor positions, int index, int batch) -> (Tensor, Tensor)",
)(engine_kivi_layer_reference)


@engine_kivi_layer.register_fake
def _(h, a, tensors, ints, floats, k_cache, v_cache, length, codes, mask, bits, cos, sin, positions, index, batch):
    return torch.empty_like(h), torch.empty_like(a)


for _op in (
    engine_layer_reference, engine_kivi_layer_reference, rms_norm_reference, add_rms_norm_reference,
    silu_mul_reference, gelu_tanh_mul_reference, rope_reference, kv_append_reference, gqa_attention_reference,
):
    register_op(_op.__name__.removesuffix("_reference"), _op)
