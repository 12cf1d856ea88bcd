"""AdaSkip: choose the sublayers to skip from similarities measured on each prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.generation import cache_argument
from ..core.model import decoder_layers
from ..core.registry import register_transform
from ..core.transform import Applied, ConfigError, UnsupportedModelError
from .calibration import Similarities, SimilarityRecorder
from .plan import SkipEntry, SkipHandle, SkipPlan, SublayerCosts
from .state import skip_state
from .strategy import SkipStrategy, plan_report, skippable


def _backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layer list and receives ``past_key_values``."""
    layers = decoder_layers(model)
    inner = getattr(model, "model", None)
    for cand in (inner, getattr(inner, "language_model", None), model):
        if cand is not None and getattr(cand, "layers", None) is layers:
            return cand
    raise UnsupportedModelError(f"cannot find the backbone module of {type(model).__name__} for AdaSkip")


def choose_sublayers(
    sims: Similarities, costs: SublayerCosts, fraction: float, candidates: dict[str, list[int]]
) -> list[SkipEntry]:
    """Most similar (least important) sublayers first, until ``fraction`` of the compute is skipped.

    A unit that would overshoot the budget is passed over for smaller ones further down the ranking.
    """
    budget = fraction * costs.total
    ranked = sorted(
        ((sims.of(sub)[i], i, sub) for sub, idx in candidates.items() for i in idx), key=lambda t: -t[0]
    )
    chosen, spent = [], 0
    for score, i, sub in ranked:
        cost = costs.of(sub)
        if spent + cost <= budget * (1 + 1e-9):
            chosen.append(SkipEntry(i, sub, round(score, 6)))
            spent += cost
    return chosen


class _AdaSkipController:
    """Measures on every prefill, then skips the chosen sublayers for the decode steps after it."""

    def __init__(self, model: nn.Module, config: AdaSkip) -> None:
        self.model, self.config = model, config
        self.costs = SublayerCosts.from_model(model)
        self.candidates = {
            "attention": skippable(model, "attention", config.protect_last),
            "mlp": skippable(model, "mlp", config.protect_last),
        }
        self.num_layers = len(decoder_layers(model))
        self.plan: SkipPlan | None = None
        self.handle: SkipHandle | None = None
        self.recorder: SimilarityRecorder | None = None
        self.prefills = 0
        backbone = _backbone(model)
        self.hooks = [
            backbone.register_forward_pre_hook(self._pre, with_kwargs=True),
            backbone.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = cache_argument(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return  # a decode step (or a continuation): keep the current plan
        self.release()  # a new sequence: run every sublayer and measure
        self.recorder = SimilarityRecorder(self.model).__enter__()

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self.recorder is None:
            return
        self.recorder.__exit__(None, None, None)
        sims, self.recorder = self.recorder.result(), None
        entries = choose_sublayers(sims, self.costs, self.config.fraction, self.candidates)
        self.plan = SkipPlan(entries, "adaskip", self.num_layers, {"fraction": self.config.fraction})
        self.handle = self.plan.apply(self.model)
        self.prefills += 1

    def release(self) -> None:
        if self.handle is not None:
            self.handle.undo()
            self.handle = None

    def remove(self) -> None:
        self.release()
        if self.recorder is not None:
            self.recorder.__exit__(None, None, None)
            self.recorder = None
        for h in self.hooks:
            h.remove()


@register_transform("adaskip")
@dataclass
class AdaSkip(SkipStrategy):
    """Per-prompt sublayer skipping from similarities measured on the fly (lossy, no calibration set).

    "AdaSkip: Adaptive Sublayer Skipping for Accelerating Long-Context LLM Inference" (He et al.,
    AAAI 2025, https://arxiv.org/abs/2501.02336): sublayer importance is read from the
    input/output similarity of each attention and MLP sublayer while the prompt is processed; the
    least important sublayers (attention and MLP ranked together) are then skipped while
    decoding. Here each prefill (a forward with an empty or no cache) runs the full model and
    measures; the decode steps that continue it skip the chosen sublayers, whose attention
    therefore stores no new KV. A forward without a cache is always a full prefill, so teacher-
    forced perplexity without a cache sees the full model; the benchmark scores continuations.

    fraction: share of decoder compute (weights) skipped while decoding.
    protect_last: never skip the last layer's sublayers.
    """
    use_when = "no calibration data and a per-prompt choice is wanted: sublayers picked from similarities measured on the prompt"

    protect_last: bool = True

    def validate(self) -> None:
        super().validate()
        if self.count is not None:
            raise ConfigError("AdaSkip mixes attention and MLP sublayers of different sizes; set fraction, not count")

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        _backbone(model)

    def apply(self, model: nn.Module) -> Applied:
        ctl = _AdaSkipController(model, self)
        skip_state(model, create=True).controller = ctl

        def undo() -> None:
            ctl.remove()
            skip_state(model).controller = None

        return Applied(
            self,
            undo=undo,
            report=lambda: {**plan_report(model, ctl.plan), "prompts_measured": ctl.prefills},
        )
