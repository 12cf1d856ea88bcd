"""Mixture-of-Experts layers on the engine: the attention half as the engine's ops, the MoE block on row-invariant kernels.

A sparse-MoE decoder layer (Mixtral, Qwen2-MoE, Qwen3-MoE) has the attention of a Mistral, Qwen2
or Qwen3 layer and, in place of one MLP, a block that routes each token to its top-k experts
(Qwen2-MoE adds a gated shared expert). The engine runs everything around the block as it runs a
dense layer: the input norm, the q/k/v projection (fused, any linear kind), per-head q/k norms,
rotary embedding, the KV append, grouped-query attention over the cache, o_proj and the residual
add fused with the post-attention norm. The block itself takes the normed rows: the model's
router, its experts (or :mod:`infertrix.moe`'s offloaded ones, which are a swap of that module)
and its shared expert.

Row invariance: the block runs on the engine's row-invariant kernels (:class:`RowMoE`) when the
engine knows its arithmetic: Mixtral's, Qwen2-MoE's and Qwen3-MoE's blocks with float32 SiLU
experts (the model's own or ``infertrix.moe``'s offloaded ones, float or low-bit): the router on
``infertrix::skinny_linear`` in chunks, softmax / top-k / renormalisation per row as the model's
router does, each expert on its rows with ``skinny_linear`` and ``infertrix::silu_mul`` (offloaded
float experts the same calls, so offloading stays bit for bit lossless), outputs added per token in
ascending expert order as the eager experts do, and Qwen2-MoE's shared expert and its sigmoid gate
on the same kernels (the gate's sigmoid computed in whole vectors, see :func:`sigmoid_rows`). So a
token's logits do not depend on the other rows of the call, the window or the batch, as on dense
layers. Before using it the plan checks it against the model's own block on a few random rows
(the routing exactly, the output to float32 rounding); a block it does not know, or one that
differs, is called as the model's module (its router is torch's ``F.linear`` over all the rows of
the call, float experts torch's GEMM over each expert's rows: not row-invariant) and ``describe()``
says which and why (``moe_blocks``).

``infertrix.moe``'s prefetch hooks (on the decoder layer's output, or on the post-attention
norm's input; marked with ``_infertrix_engine_calls``) are called here where the module path would
call them, with the same tensors, so expert prefetch works on the engine too (:func:`known_hooks`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import linears
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
    pre-hooks saw its input ``h1``, as on the module path): row-invariant (:class:`RowMoE`) where
    the plan built one, else the model's module."""
    _before(h1, lp, batch)
    if lp.moe is not None:
        return lp.moe(m)
    return lp.mlp(m.view(batch, -1, m.shape[-1])).reshape(m.shape)


_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
_VECTOR = 64  # elements: a multiple of two vectors of float32 at AVX-512 and AVX2 widths
_GRAIN = 32768  # torch's elementwise ops split work between threads above this many elements


def sigmoid_rows(x: Tensor) -> Tensor:
    """``torch.sigmoid(x)`` with every element computed by the same code whatever the shape: torch's
    CPU elementwise loops take whole pairs of vectors and finish a remainder with scalar code that
    rounds differently (181 of 4,099 random values differed between a 4,099-element call and
    one-element calls), so the values are padded to whole blocks of ``_VECTOR`` and handed over in
    single-thread pieces of at most ``_GRAIN`` elements."""
    flat = x.reshape(-1)
    n = flat.numel()
    pad = -n % _VECTOR
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    parts = [torch.sigmoid(padded[i : i + _GRAIN]) for i in range(0, padded.numel(), _GRAIN)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[:n].view(x.shape)


class RowMoE:
    """A sparse-MoE block on the engine's row-invariant kernels (see the module docstring): called
    with the normed rows ``m`` [M, C], returns the block's output [M, C]."""

    def __init__(self, block: nn.Module):
        gate = block.gate
        self.block = block
        self.normalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral's router always renormalises
        self.router = linears.fp32_rows(gate.weight.detach())
        shared = getattr(block, "shared_expert", None)
        self.shared = None
        if shared is not None:
            self.shared = (linears.linear(shared.gate_proj), linears.linear(shared.up_proj),
                           linears.linear(shared.down_proj), linears.linear(block.shared_expert_gate))

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, experts) [M, top_k] from router logits, per row as the model's router computes them."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, int(self.block.gate.top_k), dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def experts(self, m: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Each token's experts' outputs times their weights, added in ascending expert order into
        zeros (the eager experts' ``index_add_`` order), each expert on its rows alone."""
        mod = self.block.experts
        offloaded = getattr(mod, "_infertrix_offloaded", False)
        if offloaded:
            mod.runtime.enter_layer(mod.layer, m)
            expert = mod.expert_rows
        else:
            from ..moe.experts import float_expert_rows

            gate_up, down = mod.gate_up_proj.detach(), mod.down_proj.detach()

            def expert(e: int, x: Tensor) -> Tensor:
                return float_expert_rows(x, gate_up[e], down[e])

        rows: dict[int, tuple[list[int], list[int]]] = {}
        for t, ids in enumerate(experts.tolist()):
            for k, e in enumerate(ids):
                tokens, slots = rows.setdefault(e, ([], []))
                tokens.append(t)
                slots.append(k)
        out = torch.zeros_like(m)
        single = m.shape[0] == 1
        for e in sorted(rows):
            tokens, slots = rows[e]
            if single:
                y = expert(e, m) * weights[:, slots[0], None]
                out.add_(y)  # = index_add_ of one row: 0 + y, then the next expert's
                continue
            index = torch.tensor(tokens, dtype=torch.long, device=m.device)
            y = expert(e, m.index_select(0, index)) * weights[index, torch.tensor(slots, device=m.device), None]
            out.index_add_(0, index, y)
        return out

    def __call__(self, m: Tensor) -> Tensor:
        return self.output(m, *self.route(self.router(m)))

    def output(self, m: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """The block's output for rows ``m`` routed to ``experts`` with ``weights``."""
        out = self.experts(m, weights, experts)
        if self.shared is not None:
            gate, up, down, shared_gate = self.shared
            y = down(torch.ops.infertrix.silu_mul(torch.cat([gate(m), up(m)], dim=-1)))
            out = out + sigmoid_rows(shared_gate(m)) * y
        return out


def moe_report(layers: list) -> dict[str, str]:
    """``describe()``'s ``moe_blocks``: how many MoE blocks of the layer plans run on the
    row-invariant kernels, and why the others run as the model's modules."""
    blocks = [lp for lp in layers if lp.mlp is not None]
    modules: dict[str, int] = {}
    for lp in blocks:
        if lp.moe is None:
            modules[lp.moe_why] = modules.get(lp.moe_why, 0) + 1
    row = len(blocks) - sum(modules.values())
    text = f"{row} of {len(blocks)} MoE blocks on the engine's row-invariant kernels"
    if modules:
        why = "; ".join(f"{n}: {w}" for w, n in modules.items())
        text += (f"; {len(blocks) - row} run as the model's modules ({why}): their router and float experts "
                 "round by the rows of each call, so those layers' outputs are not batch- or window-invariant "
                 "as the rest of the engine is")
    return {"moe_blocks": text}


def row_moe(block: nn.Module) -> tuple[RowMoE | None, str | None]:
    """(the row-invariant version of ``block``, None) when the engine knows its arithmetic and it
    agrees with the model's block on a few random rows, else (None, why)."""
    from ..moe.lowbit import is_silu  # (infertrix.moe imports this module)

    name = type(block).__name__
    if name not in _BLOCKS:
        return None, f"a {name} (row-invariant blocks: {', '.join(_BLOCKS)})"
    gate, mod = block.gate, block.experts
    if getattr(gate, "weight", None) is None or gate.weight.dtype != torch.float32:
        return None, "its router is not a float32 weight"
    if not is_silu(mod.act_fn):
        return None, f"its experts' activation is {type(mod.act_fn).__name__} (row-invariant: SiLU)"
    offloaded = getattr(mod, "_infertrix_offloaded", False)
    if not offloaded and (getattr(mod, "gate_up_proj", None) is None or mod.gate_up_proj.dtype != torch.float32
                          or getattr(mod, "gate_up_proj_bias", None) is not None
                          or getattr(mod, "down_proj_bias", None) is not None):
        return None, "its experts are not float32 gate_up_proj / down_proj tensors without biases"
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        parts = [shared.gate_proj, shared.up_proj, shared.down_proj, getattr(block, "shared_expert_gate", None)]
        if any(p is None or linears.kind(p) is None for p in parts) or not is_silu(shared.act_fn):
            return None, "its shared expert is not SiLU over linears the engine runs"
    row = RowMoE(block)
    # offloaded experts are not probed (a probe would touch the expert cache; their arithmetic is
    # ExpertOffload's, tested against the in-memory block), nor a block with hooks (the engine
    # declines a model with user hooks, and a probe must not call them)
    if not offloaded and not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()):
        try:
            why = _disagrees(row, block)
        except Exception as e:  # noqa: BLE001 - a block the probe cannot run is one the engine does not know
            why = f"probing it against the engine's block failed ({type(e).__name__}: {e})"
        if why is not None:
            return None, why
    return row, None


@torch.no_grad()
def _disagrees(row: RowMoE, block: nn.Module) -> str | None:
    """Why ``row`` does not compute ``block`` (None: it does): the routing of the model's own
    router logits must be the same bits, the output the same to float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    c = block.gate.weight.shape[1]
    x = torch.randn(2, c, generator=gen, dtype=torch.float32)  # two rows: up to 2 k experts' weights read
    training = block.training
    block.eval()  # no router jitter (a training-mode block draws noise from the global generator)
    try:
        logits, weights, experts = block.gate(x)
        want = block(x[None]).reshape(x.shape)
    finally:
        block.train(training)
    mine_w, mine_e = row.route(logits.float())
    if not (torch.equal(mine_e, experts) and torch.equal(mine_w, weights.float())):
        return "its router's top-k weights differ from the engine's routing"
    got = row.output(x, weights.float(), experts)  # the model's routing: a near tie cannot flip an expert
    scale = want.abs().max().item() or 1.0
    if (got - want).abs().max().item() > 1e-4 * scale:
        return "its output differs from the engine's block beyond float32 rounding"
    return None


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
    return moe_tail(h1, m, lp, batch)


def moe_tail(h1: Tensor, m: Tensor, lp, batch: int) -> tuple[Tensor, Tensor]:
    """The second half of an MoE layer after its attention: h1 + block(m) (``m``: the normed
    ``h1``), the next norm, and the decoder layer's hooks on the output."""
    out = _ops.add_rms_norm(_block(h1, m, lp, batch), h1, lp.tensors[1], lp.floats[2])
    _after(out[0], lp, batch)
    return out


def moe_mlp_only(h: Tensor, lp, batch: int) -> tuple[Tensor, Tensor]:
    """An MoE layer whose attention a skip plan skips: h + block(mid_norm(h)), and the next norm."""
    t, f = lp.tensors, lp.floats
    out = _ops.add_rms_norm(_block(h, _ops.rms_norm(h, t[0], f[1]), lp, batch), h, t[1], f[2])
    _after(out[0], lp, batch)
    return out

