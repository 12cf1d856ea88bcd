"""SkipDecode: a position-dependent depth schedule, the same for every row of a batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.model import decoder_layers
from ..core.registry import register_transform
from ..core.transform import Applied, ConfigError
from .calibrated import CalibratedStrategy
from .plan import SkipEntry, SkipPlan
from .state import skip_state
from .strategy import plan_report, skippable, units_for_budget

ORDERS = ("lower", "block_influence", "uniform")


class ScheduledLayer(nn.Module):
    """Runs ``layer`` for positions below ``threshold`` and passes the hidden state through above it.

    The decision is per position (column), taken as the largest position id of the column over the
    batch rows, so every row of a batch gets the same depth at a step. A decode step whose position
    is past the threshold does not run the layer at all (and writes no KV for it). In a multi-token
    pass that straddles the threshold, the layer runs and ``torch.where`` keeps the input for the
    skipped positions: their KV entries at this layer are written but never read, because every
    later position skips this layer too (the schedule is monotonic), so this equals token-by-token
    decoding exactly.

    ``self_attn`` and ``mlp`` are the wrapped layer's own modules, so code that walks the layers'
    sublayers (the KV-cache transforms hook each ``layer.self_attn``) reaches them through the
    wrapper; their hooks fire exactly when the layer runs.
    """

    def __init__(self, layer: nn.Module, threshold: int) -> None:
        super().__init__()
        self.layer = layer
        self.threshold = threshold
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    @property
    def self_attn(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        if pos is None:
            return self.layer(hidden_states, *args, **kwargs)
        col = pos.reshape(-1, pos.shape[-1]).amax(dim=0)  # [T]: same depth for every row
        if int(col.min()) >= self.threshold:
            return hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        if int(col.max()) < self.threshold:
            return out
        skip = (col >= self.threshold).view(1, -1, 1).to(hidden_states.device)
        return torch.where(skip, hidden_states, out)

    def extra_repr(self) -> str:
        return f"skipped from position {self.threshold}"


@register_transform("skipdecode")
@dataclass
class SkipDecode(CalibratedStrategy):
    """Skip more layers as the position grows: full depth at first, ``fraction`` skipped after a ramp.

    "SkipDecode: Autoregressive Skip Decoding with Batching and Caching for Efficient LLM
    Inference" (Del Corro et al., 2023, https://arxiv.org/abs/2307.02628): the number of layers
    a token uses falls with its position along a fixed schedule, identical for every sequence of
    the batch at a step (batch-friendly), and monotonic, so a layer skipped at one position is
    skipped at every later one and no later token needs a KV entry that was never computed. As in
    the paper, the skipped layers are by default the lowest ones above layer 0 (``order="lower"``);
    ``order="block_influence"`` takes them in ShortGPT order instead (calibrated), ``"uniform"``
    evenly spread. Lossy; training-free here (the paper fine-tunes with the schedule).

    fraction / count: share of decoder compute (= of layers) skipped once the ramp is over.
    start_position: positions below this run every layer.
    ramp_tokens: positions over which the skipped depth grows linearly from 0 to its maximum.
    order: which layers go first: "lower", "block_influence" or "uniform".
    (calibration fields, used by order="block_influence": see CalibratedStrategy)
    """
    use_when = "long generations that tolerate a quality loss: fewer layers as the position grows, batch-friendly"

    start_position: int = 0
    ramp_tokens: int = 128
    order: str = "lower"

    def validate(self) -> None:
        super().validate()
        if self.order not in ORDERS:
            raise ConfigError(f"SkipDecode: order must be one of {ORDERS}, got {self.order!r}")
        if self.start_position < 0 or self.ramp_tokens < 0:
            raise ConfigError("SkipDecode: start_position and ramp_tokens must be >= 0")

    def schedule(self, model: nn.Module) -> list[tuple[int, int]]:
        """``[(layer, first skipped position), ...]`` in skipping order (thresholds non-decreasing)."""
        n = len(decoder_layers(model))
        cands = skippable(model, "layer", self.protect_last)
        k = units_for_budget(model, "layer", self.fraction, self.count, len(cands), "SkipDecode")
        if self.order == "lower":
            ordered = cands
        elif self.order == "block_influence":
            sims = self.measure(model)
            ordered = sorted(cands, key=lambda i: 1.0 - sims.layer[i])
        else:
            ordered = [cands[int((j + 0.5) * len(cands) / k)] for j in range(k)] if k else []
            # nest the evenly spread set: the most central layer goes first
            mid = (n - 1) / 2
            ordered = sorted(ordered, key=lambda i: abs(i - mid))
        return [(layer, self.start_position + math.ceil((j + 1) * self.ramp_tokens / k)) for j, layer in enumerate(ordered[:k])]

    def plan(self, model: nn.Module) -> SkipPlan:
        """The steady-state plan (after the ramp); each entry's score is its first skipped position."""
        n = len(decoder_layers(model))
        entries = [SkipEntry(i, "layer", float(t)) for i, t in self.schedule(model)]
        return SkipPlan(entries, "skipdecode", n, {"fraction": self.fraction, "ramp_tokens": self.ramp_tokens})

    def apply(self, model: nn.Module) -> Applied:
        layers = decoder_layers(model)
        sched = self.schedule(model)
        originals = {i: layers[i] for i, _ in sched}
        st = skip_state(model, create=True)
        for i, t in sched:
            layers[i] = ScheduledLayer(originals[i], t)
            st.schedule[i] = (layers[i], originals[i], t)

        plan = self.plan(model)
        from ..quant import checkpoint

        checkpoint.record_skip(model, self.recipe(), plan, schedule=sched)  # save_pretrained carries it

        def undo() -> None:
            for i, layer in originals.items():
                layers[i] = layer
                st.schedule.pop(i, None)
            checkpoint.erase(model, "skip")

        return Applied(
            self,
            undo=undo,
            report=lambda: {**plan_report(model, plan), "first_skipped_position": {i: t for i, t in sched}},
        )
