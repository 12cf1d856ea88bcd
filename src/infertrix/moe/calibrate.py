"""GPTQ-calibrated low-bit experts: each expert's input Hessians from the tokens routed to it.

EdgeMoE (Yi et al. 2023, arXiv:2308.14352) stores experts in low bit widths; rounding each weight
to its nearest code costs the upcycled SmolLM2 +15% perplexity at int4 (BENCHMARKS.md
``moe-lowbit-quality``). GPTQ (Frantar et al. 2022, arXiv:2210.17323) instead quantizes a
matrix's columns one at a time and moves each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian ``H = sum x x^T`` of the matrix's inputs. An expert
sees only the tokens its router sends it, so each expert gets its own two Hessians: of its input
(for ``gate_up``) and of ``act(gate) * up`` (for ``down``), from the calibration windows run
through the float model (Mixtral-style ``experts(hidden_states, top_k_index, top_k_weights)``
calls, captured by a forward pre-hook; see ``discovery``).

Only the captured rows are kept (``[tokens, hidden]`` per layer); a Hessian is built when its
expert is written and dropped after it, so memory stays at one expert's pair.

EdgeMoE's second half, bit widths by importance, is measured here too (``layer_costs``): how far
the next-token distributions move (KL) with one layer's experts at the low width and the rest as
they are, per layer; ``ExpertOffload(int8_layers=k)`` keeps the k costliest layers' experts in int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.calibration import run_windows, windows_for
from .discovery import MoELayer
from .lowbit import LowBitFormat
from .store import ExpertStore

#: fewer routed calibration tokens: round to nearest. Measured on the copy-upcycled SmolLM2 (4 experts,
#: 8 x 256 tokens): GPTQ from 1-15 tokens still beat nearest for the 10 experts that got so few
#: (perplexity 24.16 against 24.30 with a minimum of 16), so only experts no token reached are rounded.
MIN_TOKENS = 1


@dataclass
class RoutedInputs:
    """The rows each MoE layer's experts module received during calibration, and their experts."""

    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer index -> [rows, H]
    chosen: dict[int, Tensor] = field(default_factory=dict)  # layer index -> [rows, top_k]
    empty: set[tuple[int, int]] = field(default_factory=set)  # (layer, expert) with too few tokens
    min_tokens: int = MIN_TOKENS

    @property
    def uncalibrated(self) -> int:
        """Experts that fewer than ``MIN_TOKENS`` calibration tokens reached (rounded to nearest)."""
        return len(self.empty)

    def tokens(self, layer: int, expert: int) -> Tensor:
        """The rows routed to ``expert`` of ``layer`` (float32 ``[n, H]``)."""
        return self.hidden[layer][(self.chosen[layer] == expert).any(-1)]

    def hessians(self, layer: MoELayer, expert: int) -> tuple[Tensor, Tensor] | None:
        """``(H_gate_up [H, H], H_down [I, I])`` of one expert in float32 (sums over its routed
        tokens, accumulated in float64), or None when fewer than ``min_tokens`` were routed to it."""
        x = self.tokens(layer.index, expert).double()
        if x.shape[0] < self.min_tokens:
            self.empty.add((layer.index, expert))
            return None
        e = layer.experts
        gate, up = (x @ e.gate_up_proj[expert].detach().double().t()).chunk(2, dim=-1)
        mid = e.act_fn(gate) * up
        return (x.t() @ x).float(), (mid.t() @ mid).float()


@torch.no_grad()
def routed_inputs(model: nn.Module, layers: list[MoELayer], windows: Tensor, progress: bool = True) -> RoutedInputs:
    """Run ``windows`` (``[n, L]`` token ids) through ``model`` and keep what each layer's experts
    module was called with."""
    hidden: dict[int, list[Tensor]] = {}
    chosen: dict[int, list[Tensor]] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            k = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden.setdefault(index, []).append(h.detach().reshape(-1, h.shape[-1]).float().cpu())
            chosen.setdefault(index, []).append(k.detach().reshape(h.numel() // h.shape[-1], -1).cpu())

        return hook

    handles = [layer.experts.register_forward_pre_hook(capture(layer.index), with_kwargs=True) for layer in layers]
    try:
        run_windows(model, windows, progress, desc="expert calibration")
    finally:
        for h in handles:
            h.remove()
    missing = [layer.index for layer in layers if layer.index not in hidden]
    if missing:
        raise RuntimeError(f"calibration never reached the experts of layers {missing}")
    # one tensor per layer, each layer's chunks freed as it is joined (peak: the rows plus one layer's)
    return RoutedInputs({i: torch.cat(hidden.pop(i)) for i in list(hidden)}, {i: torch.cat(chosen.pop(i)) for i in list(chosen)})


class InMemoryExperts(nn.Module):
    """One layer's experts from low-bit blobs held in memory, computed as transformers' experts
    loop does: what a layer costs at that width, measured before the store exists."""

    def __init__(self, fmt: LowBitFormat, blobs: list[Tensor], act_fn):
        super().__init__()
        self.fmt, self.act_fn, self.parts = fmt, act_fn, [fmt.views(b) for b in blobs]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < len(self.parts):
                continue
            tok, pos = torch.where(top_k_index == e)
            y = self.fmt.forward(self.parts[e], hidden_states[tok], self.act_fn) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


@torch.no_grad()
def _log_probs(model: nn.Module, row: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return torch.log_softmax(model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float(), -1)


@torch.no_grad()
def layer_costs(model: nn.Module, layers: list[MoELayer], windows: Tensor, blobs: Callable[[MoELayer], list[Tensor]],
                fmt: Callable[[MoELayer], LowBitFormat], progress: bool = True) -> dict[int, float]:
    """EdgeMoE's bit-width profiling, per layer: how far the model's next-token distributions move
    when one layer's experts are low-bit (``blobs(layer)``, in ``fmt(layer)``) and every other
    layer's stay as they are: the KL divergence from the unchanged model's, averaged over the
    positions of ``windows``. One pass per layer and window, plus the unchanged model's.

    KL rather than the change of the calibration loss: the loss change of one layer is a few
    hundredths of a nat and of either sign, while KL is positive and steadier. Measured on dense
    SmolLM2 (each MLP one expert, GPTQ int4; 8 x 256 calibration tokens): int8 for the 4 / 8 layers
    of largest KL gave +3.0% / +3.1% perplexity on held-out text, for the largest loss change
    +3.7% / +4.3% (int4 throughout: +4.2%)."""
    from tqdm.auto import tqdm

    low = {layer.index: InMemoryExperts(fmt(layer), blobs(layer), layer.experts.act_fn) for layer in layers}
    costs = dict.fromkeys(low, 0.0)
    for row in tqdm(windows, desc="expert bit widths: each layer's cost", unit="window", disable=not progress,
                    leave=False):
        ref = _log_probs(model, row)
        for layer in layers:
            experts = layer.block.experts
            layer.block.experts = low[layer.index]
            try:
                lp = _log_probs(model, row)
            finally:
                layer.block.experts = experts
            costs[layer.index] += float((ref.exp() * (ref - lp)).sum(-1).mean()) / len(windows)
    return costs


def write_store(cfg: Any, model: nn.Module, layers: list[MoELayer], path: Path, **store_kwargs: Any) -> ExpertStore:
    """The store ``ExpertOffload`` (``cfg``) writes for ``model``: as the model holds the experts,
    or low-bit; with ``expert_gptq`` by GPTQ from each expert's routed tokens; with
    ``int8_layers`` the layers costliest at ``expert_bits`` (measured, ``layer_costs``) in int8."""
    calibration, layer_bits, encoded, notes = None, None, None, {}
    if cfg.expert_gptq or cfg.int8_layers:
        windows = windows_for(model, cfg, None, ", or expert_gptq=False and int8_layers=0 (no calibration)",
                              " (expert_gptq / int8_layers)")
        calibration = routed_inputs(model, layers, windows, cfg.progress) if cfg.expert_gptq else None
        if cfg.int8_layers:
            blobs: dict[int, list[Tensor]] = {}

            def low(layer: MoELayer) -> list[Tensor]:
                fmt = cfg.expert_format(layer)
                e = layer.experts
                blobs[layer.index] = [
                    fmt.encode(e.gate_up_proj[j], e.down_proj[j],
                               None if calibration is None else calibration.hessians(layer, j), cfg.damp)
                    for j in range(layer.num_experts)]
                return blobs[layer.index]

            costs = layer_costs(model, layers, windows, low, cfg.expert_format, cfg.progress)
            wide = sorted(costs, key=lambda i: -costs[i])[: cfg.int8_layers]
            layer_bits = dict.fromkeys(wide, 8)
            encoded = lambda i, j: None if i in layer_bits else blobs[i][j]  # noqa: E731
            notes = {"layer_costs": {str(i): c for i, c in sorted(costs.items())}}
    return ExpertStore.from_model(model, path, cfg.expert_bits, cfg.expert_group_size, calibration, cfg.damp,
                                  layer_bits, encoded, notes, progress=cfg.progress, **store_kwargs)
