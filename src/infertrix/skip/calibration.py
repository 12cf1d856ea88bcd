"""Measuring how much each decoder layer and sublayer changes the hidden state.

ShortGPT's block influence, the attention-dropping criterion of He et al. and AdaSkip's
importance all reduce to one figure: the cosine similarity between the residual stream entering a
unit and the residual stream leaving it (``cos(h, h + f(h))``). :class:`SimilarityRecorder`
measures all three granularities (whole layer, attention, MLP) in one forward pass with forward
hooks on the model's own modules (removed on exit), so strategies share it. The calibration
windows come from :mod:`infertrix.core.calibration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.calibration import run_windows, token_windows
from ..core.model import decoder_layers


@dataclass
class Similarities:
    """Mean cosine similarity (over tokens) between each unit's input and output residual stream.

    High similarity = the unit barely changes the hidden state = a good candidate to skip.
    ``layer[i]`` is ShortGPT's ``1 - BI`` of layer ``i``.
    """

    layer: list[float]
    attention: list[float]
    mlp: list[float]
    tokens: int

    def of(self, sublayer: str) -> list[float]:
        return {"layer": self.layer, "attention": self.attention, "mlp": self.mlp}[sublayer]


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum().item()


class SimilarityRecorder:
    """Forward hooks that accumulate per-layer / per-sublayer input-output similarities.

    Use as a context manager around forward passes; ``enabled`` can be switched off to let
    passes through unmeasured. ``result()`` gives the means. Only the residual additions are
    assumed: ``h + f(norm(h))``, or Gemma's ``h + post_norm(f(pre_norm(h)))``, detected by the
    layer having a ``pre_feedforward_layernorm``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        n = len(self.layers)
        self.sums = {"layer": [0.0] * n, "attention": [0.0] * n, "mlp": [0.0] * n}
        self.counts = {"layer": [0] * n, "attention": [0] * n, "mlp": [0] * n}
        self.enabled = True
        self._handles: list[Any] = []
        self._inputs: dict[int, torch.Tensor] = {}
        self._mid: dict[int, torch.Tensor] = {}

    def _add(self, kind: str, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.sums[kind][i] += _cos_sum(a, b)
        self.counts[kind][i] += a.shape[:-1].numel()

    def __enter__(self) -> SimilarityRecorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_post(i)))
            gemma_style = hasattr(layer, "pre_feedforward_layernorm")
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if isinstance(attn, nn.Module):
                post = layer.post_attention_layernorm if gemma_style else None
                self._handles.append(attn.register_forward_hook(self._attn_post(i, post)))
            if isinstance(mlp, nn.Module):
                post = layer.post_feedforward_layernorm if gemma_style else None
                self._handles.append(mlp.register_forward_hook(self._mlp_post(i, post)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._mid.clear()

    def _layer_pre(self, i: int):
        def hook(module, args, kwargs):
            if self.enabled:
                self._inputs[i] = _hidden_arg(args, kwargs)

        return hook

    def _layer_post(self, i: int):
        def hook(module, args, output):
            if self.enabled and i in self._inputs:
                out = output[0] if isinstance(output, tuple) else output
                self._add("layer", i, self._inputs.pop(i), out)
                self._mid.pop(i, None)

        return hook

    def _attn_post(self, i: int, post_norm: nn.Module | None):
        def hook(module, args, output):
            if self.enabled and i in self._inputs:
                delta = output[0] if isinstance(output, tuple) else output
                if post_norm is not None:
                    delta = post_norm(delta)
                h = self._inputs[i]
                mid = h + delta
                self._mid[i] = mid
                self._add("attention", i, h, mid)

        return hook

    def _mlp_post(self, i: int, post_norm: nn.Module | None):
        def hook(module, args, output):
            if self.enabled and i in self._mid:
                delta = post_norm(output) if post_norm is not None else output
                h = self._mid[i]
                self._add("mlp", i, h, h + delta)

        return hook

    def result(self) -> Similarities:
        def mean(kind: str) -> list[float]:
            return [s / c if c else 1.0 for s, c in zip(self.sums[kind], self.counts[kind], strict=True)]

        return Similarities(mean("layer"), mean("attention"), mean("mlp"), max(self.counts["layer"], default=0))


@torch.inference_mode()
def measure_similarities(
    model: nn.Module,
    input_ids: torch.Tensor,
    window_tokens: int = 512,
    progress: bool = True,
    desc: str = "calibrating",
) -> Similarities:
    """Run ``input_ids`` through ``model`` and measure: windows [n, L] as they are, 1-D ids cut
    into windows of ``window_tokens`` (:func:`infertrix.core.calibration.token_windows`)."""
    windows = token_windows(ids=input_ids, window_tokens=window_tokens)
    with SimilarityRecorder(model) as rec:
        run_windows(model, windows, progress, desc)
    return rec.result()
