"""Self-speculative decoding: the model drafts for itself under a cheaper plan, then verifies.

Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
Decoding" (ACL 2024, https://arxiv.org/abs/2309.08168); Xia et al., "SWIFT: On-the-Fly
Self-Speculative Decoding for LLM Inference Acceleration" (ICLR 2025,
https://arxiv.org/abs/2410.06916). No second model: drafting runs the target itself under a plan
of the skip family (:class:`~infertrix.skip.SkipPlan`, on the module path applied around each draft forward with
``plan.active(model)``, or a :class:`~infertrix.skip.SkipStrategy` such as ``AttentionDrop`` that
picks one for the model), or under any ``plan(model)`` context manager that changes the model on
entry and undoes it on exit. A skip plan drafts on the decode engine where it runs the model (the
engine skips the plan's units per forward, no module is swapped); a context drafts on the module
path. The draft keeps its own KV
cache (:class:`~.draft_model.DraftModelDrafter`), so the plan's cache never mixes with the
verifier's. Lossless whatever the plan: a poor plan only lowers acceptance.

On-line plan search (SWIFT's idea, simplified): given several candidate plans, the first
``search_steps`` verification steps of a call go to each candidate in turn (the draft cache is
rebuilt at each switch, since plans keep different layers), each drafting ``num_tokens`` tokens
(a fixed length, so the plans are compared alike) and scored by tokens emitted per second of
drafting plus verification (accepted length alone would always pick the plan that skips
least); the best is kept for the rest of the call and for later calls, and its draft length then
follows the measured costs (:mod:`.budget`). Without ``plan``, the candidates are attention
dropping at 10% and 20% of the decoder compute and ShortGPT at 10% (calibrated once, when the
transform is applied). Measured on SmolLM2 (issue 6): dropping a quarter of its layers accepted 5.6% of draft
tokens, so plans should be chosen by measured acceptance, not by a fixed layer count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from ..skip import AttentionDrop, ShortGPT, SkipPlan, SkipStrategy
from .draft_model import DraftModelDrafter
from .drafter import Draft, Drafter
from .state import prepared, prepared_for
from .transform import SpeculativeDecoding

Plan = SkipPlan | Callable[[nn.Module], AbstractContextManager]


@dataclass
class PlanSearch:
    """Scores of the candidate plans (tokens per second while each was drafting); kept in the
    model's run-time record so that later calls start from the best plan."""

    names: list[str]
    tokens: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best: int | None = None

    def __post_init__(self) -> None:
        self.tokens = [0.0] * len(self.names)
        self.seconds = [0.0] * len(self.names)

    def rates(self) -> list[float]:
        return [t / s if s > 0 else 0.0 for t, s in zip(self.tokens, self.seconds, strict=True)]

    def report(self) -> dict[str, Any]:
        return {
            "plans (tokens/s while drafting)": dict(zip(self.names, [round(r, 2) for r in self.rates()], strict=True)),
            "chosen plan": None if self.best is None else self.names[self.best],
        }


class SelfSpeculativeDrafter(DraftModelDrafter):
    """Drafts with the target under ``plans[current]``; searches the plans on the first call."""

    def __init__(self, model: nn.Module, plans: Sequence[Plan], search: PlanSearch, search_steps: int, **kw):
        super().__init__(model, context=lambda: self._enter(model), **kw)
        self.plans = list(plans)
        self.search = search
        self.search_steps = search_steps
        self.current = search.best if search.best is not None else 0
        self.steps = 0
        self.last_time: float | None = None
        self.pending_tokens = 0

    def _enter(self, model: nn.Module) -> AbstractContextManager:
        plan = self.plans[self.current]
        return plan.active(model) if isinstance(plan, SkipPlan) else plan(model)

    def start(self, model: nn.Module, ctx) -> None:
        super().start(model, ctx)
        # the weights a draft forward reads against a step's: the cheapest candidate's (the best case
        # the never-slower guard weighs before the plan search; skipping 10-20% of the layers' weights
        # of a small model leaves a draft at 0.8-0.9 of a step, which cannot pay)
        from ..skip.plan import SublayerCosts

        costs = SublayerCosts.from_model(model)
        head = model.get_output_embeddings()
        head_macs = head.weight.numel() if head is not None and getattr(head, "weight", None) is not None else 0
        if all(isinstance(p, SkipPlan) for p in self.plans) and self.plans:
            kept = min(1.0 - p.compute_fraction(costs) for p in self.plans)
            self.cost_ratio = (kept * costs.total + head_macs) / (costs.total + head_macs)

    def shared_skip(self):
        """Every candidate a skip plan: drafts run on the model's own cache (engine), the current plan's
        units skipped; a plan that is another context keeps a draft cache of its own."""
        if not all(isinstance(p, SkipPlan) for p in self.plans):
            return None
        return lambda: self.plans[self.current]

    def engine_skip(self) -> tuple[bool, SkipPlan | None]:
        """A skip plan drafts on the engine (its runner skips the plan's units); another context runs
        the module path."""
        plan = self.plans[self.current]
        return (True, plan) if isinstance(plan, SkipPlan) else (False, None)

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        now = time.perf_counter()
        if self.search.best is None:
            if self.last_time is not None:  # score the step that just ended (draft + verify)
                self.search.tokens[self.current] += self.pending_tokens
                self.search.seconds[self.current] += now - self.last_time
            if self.steps and self.steps % self.search_steps == 0:
                if self.current + 1 < len(self.plans):
                    self.current += 1
                else:
                    rates = self.search.rates()
                    self.search.best = max(range(len(rates)), key=rates.__getitem__)
                    self.current = self.search.best
                self.reset_cache()
            self.last_time = time.perf_counter()
        return super().propose(seqs, limits)

    @property
    def measuring(self) -> bool:
        """While the plan search runs it drafts every step (a GainGuard lets it: it is measuring)."""
        return self.search.best is None

    def length(self, limits: list[int]) -> int:
        if self.search.best is None:  # searching: every plan drafts the same fixed length
            return min(self.num_tokens, self.max_tokens)
        return super().length(limits)

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        super().observe(drafted, accepted)
        self.steps += 1
        self.pending_tokens = sum(a + 1 for d, a in zip(drafted, accepted, strict=True) if d > 0)


@register_transform("self_speculative")
@dataclass
class SelfSpeculative(SpeculativeDecoding):
    """Self-speculation through a plan activated around each draft forward (Draft & Verify,
    https://arxiv.org/abs/2309.08168; SWIFT, https://arxiv.org/abs/2410.06916). Lossless; no
    extra weights; the draft cache costs as much as the plan keeps.

    Fields:
      plan: a :class:`~infertrix.skip.SkipPlan`, a :class:`~infertrix.skip.SkipStrategy` (its plan
        for the model is computed when the transform is applied), or ``plan(model)`` returning a
        context manager under which the model is the draft; or a list of them to search on-line.
        None: attention dropping at 10% and 20% and ShortGPT at 10% of the decoder compute.
      search_steps: verification steps given to each candidate plan during the search.
      num_tokens, adaptive, max_tokens, confidence: as in :class:`~.draft_model.DraftModel`
        (``num_tokens`` is also the draft length while searching).
    """
    use_when = "open-ended output and no draft model: drafts with the model's own layer-skip plan; lossless"

    primary = "num_tokens"
    bench_recipe: ClassVar[str | None] = "self_speculative"
    plan: Any = field(default=None, repr=False)
    num_tokens: int = 4
    adaptive: bool = True
    max_tokens: int = 10
    confidence: float = 0.3
    search_steps: int = 8

    def validate(self) -> None:
        bad = [p for p in self.plans() if not (isinstance(p, SkipPlan | SkipStrategy) or callable(p))]
        if bad or (self.plan is not None and not self.plans()):
            raise ConfigError(
                "SelfSpeculative needs plan=SkipPlan, a SkipStrategy, or callable(model) returning a context "
                "manager that puts the model in its draft configuration and undoes it on exit (or a list of "
                f"them); got {bad[0] if bad else self.plan!r}"
            )
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"SelfSpeculative needs 1 <= num_tokens <= max_tokens, got {self.num_tokens}, {self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"SelfSpeculative confidence must be in [0, 1), got {self.confidence}")
        if self.search_steps < 1:
            raise ConfigError(f"SelfSpeculative search_steps must be >= 1, got {self.search_steps}")

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        if self.adaptive or len(self.plans()) > 1:
            return ("the plan search and adaptive draft lengths follow measured times, which differ between "
                    "ranks (their forwards would stop matching); give one plan and adaptive=false")
        return None

    def plans(self) -> list[Any]:
        if self.plan is None:
            return [AttentionDrop(fraction=0.1, progress=False), AttentionDrop(fraction=0.2, progress=False),
                    ShortGPT(fraction=0.1, progress=False)]
        return list(self.plan) if isinstance(self.plan, list | tuple) else [self.plan]

    def check_model(self, model: nn.Module) -> None:
        self.resolve(model)

    def resolve(self, model: nn.Module) -> tuple[list[tuple[str, Plan]], PlanSearch]:
        """(name, plan callable) for each candidate, and their search, for ``model``; skip strategies
        calibrate here, once per model (kept in its run-time record)."""
        return prepared_for(model, self, lambda: self._resolve(model))

    def _resolve(self, model: nn.Module) -> tuple[list[tuple[str, Plan]], PlanSearch]:
        out: list[tuple[str, Plan]] = []
        for i, p in enumerate(self.plans()):
            if isinstance(p, SkipStrategy):
                p = p.plan(model)
            if isinstance(p, SkipPlan):
                p.validate(model)
                out.append((f"{p.method} {p.compute_fraction(model):.0%} [{p.units()}]", p))
            else:
                out.append((getattr(p, "__name__", f"plan{i}"), p))
        search = PlanSearch([name for name, _ in out])
        if len(out) == 1:
            search.best = 0
        return out, search

    def plan_search(self, model: nn.Module) -> PlanSearch | None:
        """The scores of the candidate plans on ``model`` while this transform is applied."""
        kept = prepared(model, self)
        return kept[1] if kept else None

    def drafter_report(self, model: nn.Module) -> dict[str, Any]:
        return (self.plan_search(model) or PlanSearch([])).report()

    def make_drafter(self, model: nn.Module) -> Drafter:
        plans, search = self.resolve(model)
        return SelfSpeculativeDrafter(
            model, [fn for _, fn in plans], search, self.search_steps,
            num_tokens=self.num_tokens, confidence=self.confidence, adaptive=self.adaptive,
            max_tokens=self.max_tokens, share=True,
        )
