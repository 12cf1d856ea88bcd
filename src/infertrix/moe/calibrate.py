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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.calibration import run_windows
from .discovery import MoELayer


@dataclass
class RoutedInputs:
    """The rows each MoE layer's experts module received during calibration, and their experts."""

    hidden: dict[int, list[Tensor]] = field(default_factory=dict)  # layer index -> [rows, H] chunks
    chosen: dict[int, list[Tensor]] = field(default_factory=dict)  # layer index -> [rows, top_k] chunks
    uncalibrated: int = 0  # experts that received no token (quantized by rounding to nearest)

    def tokens(self, layer: int, expert: int) -> Tensor:
        """The rows routed to ``expert`` of ``layer`` (float32 ``[n, H]``)."""
        hidden, chosen = torch.cat(self.hidden[layer]), torch.cat(self.chosen[layer])
        return hidden[(chosen == expert).any(-1)]

    def hessians(self, layer: MoELayer, expert: int) -> tuple[Tensor, Tensor] | None:
        """``(H_gate_up [H, H], H_down [I, I])`` of one expert in float32 (sums over its routed
        tokens, accumulated in float64), or None when no token was routed to it."""
        x = self.tokens(layer.index, expert).double()
        if x.shape[0] == 0:
            self.uncalibrated += 1
            return None
        e = layer.experts
        gate, up = (x @ e.gate_up_proj[expert].detach().double().t()).chunk(2, dim=-1)
        mid = e.act_fn(gate) * up
        return (x.t() @ x).float(), (mid.t() @ mid).float()


@torch.no_grad()
def routed_inputs(model: nn.Module, layers: list[MoELayer], windows: Tensor, progress: bool = True) -> RoutedInputs:
    """Run ``windows`` (``[n, L]`` token ids) through ``model`` and keep what each layer's experts
    module was called with."""
    seen = RoutedInputs()

    def capture(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen.hidden.setdefault(index, []).append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())
            seen.chosen.setdefault(index, []).append(chosen.detach().reshape(hidden.numel() // hidden.shape[-1], -1).cpu())

        return hook

    handles = [layer.experts.register_forward_pre_hook(capture(layer.index), with_kwargs=True) for layer in layers]
    try:
        run_windows(model, windows, progress, desc="expert calibration")
    finally:
        for h in handles:
            h.remove()
    missing = [layer.index for layer in layers if layer.index not in seen.hidden]
    if missing:
        raise RuntimeError(f"calibration never reached the experts of layers {missing}")
    return seen
