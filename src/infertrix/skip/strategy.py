"""The base every skip strategy shares: a budget, a ``plan(model)`` step and ``apply``.

A strategy is a :class:`~infertrix.core.Transform` at the LAYERS stage. Static strategies
(uniform, ShortGPT, attention dropping) implement :meth:`SkipStrategy.plan` and inherit
``apply`` (apply the plan, undo restores the same module objects). Dynamic ones (SkipDecode,
AdaSkip) override ``apply``. The budget is the share of the decoder layers' compute (their
weights, see :class:`~.plan.SublayerCosts`) to skip, ``fraction``, or an explicit ``count`` of
units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.model import decoder_layers
from ..core.transform import Applied, ConfigError, Stage, Transform
from .plan import SkipHandle, SkipPlan, SublayerCosts, anchor_layers


def units_for_budget(
    model: nn.Module, sublayer: str, fraction: float, count: int | None, available: int, who: str
) -> int:
    """How many ``sublayer`` units a budget asks for; a clear error when the model has too few."""
    costs = SublayerCosts.from_model(model)
    k = count if count is not None else round(fraction * costs.total / costs.of(sublayer))
    if k > available:
        most = available * costs.of(sublayer) / costs.total
        raise ConfigError(
            f"{who} would skip {k} {sublayer} units but this model has only {available} that may be "
            f"skipped (at most {most:.0%} of its decoder compute); lower fraction/count"
            + (" or skip whole layers (ShortGPT)" if sublayer != "layer" else "")
        )
    return k


def skippable(model: nn.Module, sublayer: str, protect_last: bool = True) -> list[int]:
    """Layer indices whose ``sublayer`` a strategy may choose (anchors and optionally the last layer out)."""
    n = len(decoder_layers(model))
    blocked = anchor_layers(model) if sublayer != "mlp" else {0}
    if protect_last:
        blocked = blocked | {n - 1}
    return [i for i in range(n) if i not in blocked]


def recorded(model: nn.Module, transform: Transform, plan: SkipPlan, handle: SkipHandle) -> Callable[[], None]:
    """Record ``plan`` in ``model.config`` for ``save_pretrained`` (re-applied by ``from_pretrained``);
    returns the undo that reverts both."""
    from ..quant import checkpoint

    checkpoint.record_skip(model, transform.recipe(), plan)

    def undo() -> None:
        handle.undo()
        checkpoint.erase(model, "skip")

    return undo


def plan_report(model: nn.Module, plan: SkipPlan | None) -> dict[str, Any]:
    if plan is None:
        return {"plan": "none yet"}
    return {
        "skipped": plan.units() or "nothing",
        "compute_skipped": f"{plan.compute_fraction(model):.1%}",
        "attention_kv_layers_dropped": sum(1 for e in plan if e.sublayer != "mlp"),
    }


@dataclass
class SkipStrategy(Transform):
    """Base of the skip strategies. Fields shared by all:

    fraction: share of the decoder layers' compute (weights) to skip, in [0, 1).
    count: number of units (layers or sublayers) to skip instead of ``fraction``; None uses ``fraction``.
    """

    stage: ClassVar[Stage] = Stage.LAYERS
    conflict_group: ClassVar[str | None] = "layer skipping"
    primary: ClassVar[str | None] = "fraction"

    fraction: float = 0.2
    count: int | None = None

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return None  # plans are chosen from replicated hidden states: the same on every rank

    def validate(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ConfigError(f"{type(self).__name__}: fraction must be in [0, 1), got {self.fraction}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            raise ConfigError(f"{type(self).__name__}: count must be a non-negative int or None, got {self.count!r}")

    def check_model(self, model: nn.Module) -> None:
        decoder_layers(model)
        SublayerCosts.from_model(model)

    def plan(self, model: nn.Module) -> SkipPlan:
        """The plan this strategy picks for ``model`` (static strategies)."""
        raise NotImplementedError(f"{type(self).__name__}.plan")

    def apply(self, model: nn.Module) -> Applied:
        plan = self.plan(model)
        handle = plan.apply(model)
        return Applied(self, undo=recorded(model, self, plan, handle), held=handle.held, report=lambda: plan_report(model, plan))
