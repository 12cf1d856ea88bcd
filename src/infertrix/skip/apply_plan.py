"""Apply a ready-made :class:`~.plan.SkipPlan` (an object or a saved JSON file) through ``optimize``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..core.registry import register_transform
from ..core.transform import Applied, ConfigError, Stage, Transform
from .plan import SkipPlan
from .strategy import plan_report, recorded


@register_transform("skip_plan", "skipplan")
@dataclass
class ApplySkipPlan(Transform):
    """Skip exactly the units of a saved plan (lossy; saves their compute and, for attention, KV cache).

    path: a JSON file written by ``SkipPlan.save`` (the recipe ``skip_plan:plan.json``).
    plan: a SkipPlan object instead of ``path``.
    """
    use_when = "a plan calibrated once (ShortGPT, attention drop) is to be reused without recalibrating"

    stage: ClassVar[Stage] = Stage.LAYERS
    conflict_group: ClassVar[str | None] = "layer skipping"
    primary: ClassVar[str | None] = "path"
    bench_recipe: ClassVar[str | None] = None  # needs a plan file: not part of `infertrix bench --all-recipes`

    path: str | None = None
    plan: SkipPlan | None = field(default=None, repr=False, compare=False)

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return None  # the same layers are passed through on every rank

    def validate(self) -> None:
        if (self.path is None) == (self.plan is None):
            raise ConfigError("ApplySkipPlan needs exactly one of path='plan.json' or plan=SkipPlan(...)")

    def resolved(self) -> SkipPlan:
        return self.plan if self.plan is not None else SkipPlan.load(self.path)

    def check_model(self, model: nn.Module) -> None:
        self.resolved().validate(model)

    def apply(self, model: nn.Module) -> Applied:
        plan = self.resolved()
        handle = plan.apply(model)
        return Applied(self, undo=recorded(model, self, plan, handle), held=handle.held, report=lambda: plan_report(model, plan))
