"""Pass-through modules that stand in for a skipped decoder layer or sublayer.

They hold no weights and no reference to what they replace (the :class:`~.plan.SkipHandle` that
swapped them in keeps the originals), so the model's ``state_dict`` simply loses the skipped
weights while a plan is applied and gets them back, the same objects, on undo.

A skipped whole layer still has the shape of a decoder layer, ``self_attn`` and ``mlp`` (pass-through
stubs that never run), so code that walks the layers' sublayers (the KV-cache transforms hook each
``layer.self_attn``) sees a layer whose attention stores nothing rather than a foreign module.

Why zeros for a sublayer instead of an architecture-specific "half layer": every decoder layer
we support adds its sublayers through a residual, ``h + f(norm(h))`` (Gemma adds one more norm,
``h + post_norm(f(pre_norm(h)))``, and an RMSNorm of zeros is zero). Returning a zero update
therefore gives exactly ``h`` in every architecture without re-implementing any layer, at the cost
of one RMSNorm per skipped sublayer, which is negligible next to the matrix products skipped.
"""

from __future__ import annotations

import torch
from torch import nn


class SkippedLayer(nn.Module):
    """Stands in for a whole decoder layer: returns its input hidden states unchanged.

    It never touches the KV cache, so the cache entry of its layer stays empty (or, when the plan
    is only active for part of a generation, keeps exactly what the full layer stored). Its
    ``self_attn`` and ``mlp`` are stubs that are never called (see the module docstring).
    """

    def __init__(self, layer_idx: int, attention_type: str | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        if attention_type is not None:
            self.attention_type = attention_type  # read by some models' layer loops
        self.self_attn = SkippedAttention(layer_idx)
        self.mlp = SkippedMLP(layer_idx)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class SkippedAttention(nn.Module):
    """Stands in for a layer's attention: a zero update, and no KV-cache write for its layer.

    ``stores_kv = False`` tells other families (the KV-cache hooks) that this module writes nothing
    to the cache, so they leave it alone.
    """

    stores_kv = False

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class SkippedMLP(nn.Module):
    """Stands in for a layer's MLP: a zero update."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


PASS_THROUGH = (SkippedLayer, SkippedAttention, SkippedMLP)
