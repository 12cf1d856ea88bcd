"""``OffloadedExperts``: the drop-in replacement of a layer's fused experts module.

It is called exactly like transformers 5's experts modules, ``experts(hidden_states,
top_k_index, top_k_weights)``, by the model's own sparse-MoE block after the model's own router,
so routing, shared experts and everything else stay the model's code. We swap the module on
this model instance instead of registering a function in transformers' global
``ExpertsInterface``: that registry is process-wide and is selected through the shared config,
so it could not give two models in one process different offloading.

The computation is the model's, expert by expert: with ``experts_implementation="eager"`` the
same ops in the same order (index_add_ in ascending expert order), otherwise (``grouped_mm``,
``batched_mm``) the per-(token, k) outputs summed over k as those kernels do. Only the place the
weights come from changes: a cache slot, or the store itself (Fiddler's in-place compute).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ExpertCache
from .discovery import MoELayer
from .prefetch import Prefetcher, predict_experts


class OffloadRuntime:
    """State shared by one model's offloaded layers: the cache, the prefetcher, layer order."""

    def __init__(
        self, cache: ExpertCache, layers: list[MoELayer], prefetcher: Prefetcher | None, early: bool = False
    ):
        self.cache, self.layers, self.prefetcher, self.early = cache, layers, prefetcher, early
        self.next_of = {a.index: b for a, b in zip(layers, layers[1:], strict=False)}
        self.residual: dict[int, torch.Tensor] = {}
        self.step = 0

    def enter_layer(self, layer: int, hidden_states: torch.Tensor) -> None:
        """Called at the start of each offloaded layer: surface worker errors; with ``early``
        (prefetch_signal="attention"), queue the next layer's guess from this layer's residual."""
        self.step += 1
        pf = self.prefetcher
        if pf is None:
            return
        pf.check()
        pf.step = self.step
        nxt = self.next_of.get(layer)
        if nxt is None or not self.early:
            return
        h = self.residual.pop(layer, None)
        if h is None:  # no norm hook on this architecture: use the block's (normed) input
            h = hidden_states
            experts = predict_experts(h, _without_norm(nxt), self.cache.capacities[nxt.index])
        else:
            experts = predict_experts(h, nxt, self.cache.capacities[nxt.index])
        pf.submit(nxt.index, experts, self.step + 1)


    def prefetch_after(self, layer: int, hidden: torch.Tensor) -> None:
        """Called with layer ``layer``'s output: queue the next MoE layer's guessed experts."""
        nxt, pf = self.next_of.get(layer), self.prefetcher
        if nxt is None or pf is None or pf.error is not None:
            return
        pf.submit(nxt.index, predict_experts(hidden, nxt, self.cache.capacities[nxt.index]), self.step + 1)


def _without_norm(layer: MoELayer) -> MoELayer:
    return MoELayer(layer.index, layer.block, layer.experts, layer.router, None, layer.decoder_layer)


class OffloadedExperts(nn.Module):
    """Experts of one MoE layer served by an :class:`ExpertCache` (see the module docstring)."""

    _infertrix_offloaded = True

    def __init__(self, original: nn.Module, layer: int, runtime: OffloadRuntime):
        super().__init__()
        self.layer = layer
        self.num_experts = int(original.gate_up_proj.shape[0])
        self.act_fn = original.act_fn
        config = getattr(original, "config", None)
        impl = getattr(config, "_experts_implementation", None)
        self.eager = impl in (None, "eager")
        self.experts_implementation = impl or "eager"
        # not a submodule/attribute nn.Module tracks, so state_dict() does not hold cache slots
        self.__dict__["runtime"] = runtime

    @property
    def cache(self) -> ExpertCache:
        return self.runtime.cache

    def extra_repr(self) -> str:
        c = self.cache
        return f"layer={self.layer}, experts={self.num_experts}, resident<={c.capacities[self.layer]}, policy={c.policy}"

    def _expert(self, e: int, x: torch.Tensor, n: int, rows: bool = False) -> torch.Tensor:
        """Expert ``e`` applied to the ``n`` rows of ``x``, with its weights from the cache.
        ``rows``: float experts on the decode engine's row-invariant kernels (``expert_rows``)."""
        cache = self.cache
        t0 = time.perf_counter()
        handle = cache.acquire(self.layer, e, n)
        try:
            if handle.parts is not None:  # int8/int4 expert: its own kernels on the slot's views
                y = cache.layers[self.layer].format.forward(handle.parts, x, self.act_fn)
            elif rows:
                y = float_expert_rows(x, handle.gate_up, handle.down)
            else:
                gate, up = F.linear(x.to(handle.gate_up.dtype), handle.gate_up).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, handle.down)
        finally:
            handle.release()
        if handle.kind != "hit":
            cache.miss_policy.record(handle.kind, n, time.perf_counter() - t0, cache.layers[self.layer].expert_bytes)
        return y

    def expert_rows(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` [n, C] with every row computed on its own (the decode engine's
        row-invariant MoE block, ``engine/moe.py``): float experts on ``infertrix::skinny_linear``
        and ``infertrix::silu_mul``, the same arithmetic as the engine's in-memory experts; low-bit
        experts on their own kernels, which are row-invariant already. SiLU experts only (the
        engine checks)."""
        return self._expert(e, x, int(x.shape[0]), rows=True)

    def _one_token(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Decoding (one token): the same arithmetic as the general path below, without its
        routing bookkeeping (one_hot/unique/nonzero/index ops cost more than the expert on CPU)."""
        ids = top_k_index[0].tolist()
        weights = top_k_weights[0]
        ys: list[torch.Tensor | None] = [None] * len(ids)
        for pos in sorted(range(len(ids)), key=ids.__getitem__):  # ascending expert id, as below
            if ids[pos] < self.num_experts:
                ys[pos] = self._expert(ids[pos], hidden_states, 1) * weights[pos]
        if self.eager:  # index_add_ into zeros in ascending expert order: 0 + a + b ...
            out = None
            for pos in sorted(range(len(ids)), key=ids.__getitem__):
                if ys[pos] is not None:
                    out = ys[pos] if out is None else out + ys[pos]
            return torch.zeros_like(hidden_states) if out is None else out.to(hidden_states.dtype)
        # grouped_mm / batched_mm: per-(token, k) outputs summed over k
        ys = [y if y is not None else hidden_states.new_zeros(hidden_states.shape) for y in ys]
        return torch.stack(ys, dim=1).sum(dim=1).to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        self.runtime.enter_layer(self.layer, hidden_states)
        if hidden_states.shape[0] == 1:
            with torch.no_grad():
                return self._one_token(hidden_states, top_k_index, top_k_weights)
        num_k = top_k_index.shape[-1]
        with torch.no_grad():
            if self.eager:
                final = torch.zeros_like(hidden_states)
                mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
            else:
                flat = top_k_index.reshape(-1)
                weights = top_k_weights.reshape(-1)
                hit = torch.unique(flat).tolist()
                buf = None
        for e in hit:
            if e >= self.num_experts:
                continue
            if self.eager:
                top_k_pos, token_idx = torch.where(mask[e])
            else:
                pos = (flat == e).nonzero().flatten()
                token_idx = pos // num_k
            y = self._expert(e, hidden_states[token_idx], int(token_idx.numel()))
            if self.eager:
                y = y * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, y.to(final.dtype))
            else:
                if buf is None:
                    buf = y.new_zeros(flat.shape[0], y.shape[-1])
                buf[pos] = y * weights[pos].unsqueeze(-1)
        if self.eager:
            return final
        if buf is None:
            return torch.zeros_like(hidden_states)
        return buf.view(-1, num_k, buf.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def float_expert_rows(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A float32 SiLU expert ``down(silu(gate(x)) * up(x))`` with each row computed on its own:
    ``gate_up`` [2I, C] (gate rows first) and ``down`` [C, I] on the engine's row-invariant
    kernels. Shared by the engine's in-memory experts and offloaded float experts, so the two give
    the same bits."""
    from ..engine.linears import fp32_rows

    return fp32_rows(down)(torch.ops.infertrix.silu_mul(fp32_rows(gate_up)(x)))
