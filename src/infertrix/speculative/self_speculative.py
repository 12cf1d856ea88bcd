"""Self-speculative decoding: the model drafts for itself under a cheaper plan, then verifies.

Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
Decoding" (ACL 2024, https://arxiv.org/abs/2309.08168); Xia et al., "SWIFT: On-the-Fly
Self-Speculative Decoding for LLM Inference Acceleration" (ICLR 2025,
https://arxiv.org/abs/2410.06916). No second model: drafting runs the target itself inside
``plan(model)``, a context manager that applies a plan on entry and removes it on exit (a skip
plan from the skip family, the model under another precision...). The draft keeps its own KV
cache (:class:`~.draft_model.DraftModelDrafter`), so the plan's cache never mixes with the
verifier's. Lossless whatever the plan: a poor plan only lowers acceptance.

On-line plan search (SWIFT's idea, simplified): given several candidate plans, the first
``search_steps`` verification steps of a call go to each candidate in turn (the draft cache is
rebuilt at each switch, since plans keep different layers), each scored by tokens emitted per
second of drafting plus verification; the best is kept for the rest of the call and for later
calls. Measured on SmolLM2 (issue 6): dropping a quarter of its layers accepted 5.6% of draft
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
from .draft_model import DraftModelDrafter
from .drafter import Draft, Drafter
from .transform import SpeculativeDecoding

Plan = Callable[[nn.Module], AbstractContextManager]


@dataclass
class PlanSearch:
    """Scores of the candidate plans (tokens per second while each was drafting); kept on the
    transform so that later calls start from the best plan."""

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
        super().__init__(model, context=lambda: self.plans[self.current](model), **kw)
        self.plans = list(plans)
        self.search = search
        self.search_steps = search_steps
        self.current = search.best if search.best is not None else 0
        self.steps = 0
        self.last_time: float | None = None
        self.pending_tokens = 0

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
      plan: ``plan(model)`` returns a context manager under which the model is the draft (for
        example one that applies a skip plan and restores the layers on exit), or a list of such
        candidates to search on-line.
      search_steps: verification steps given to each candidate plan during the search.
      num_tokens, adaptive, max_tokens, confidence: as in :class:`~.draft_model.DraftModel`.
    """

    primary = "num_tokens"
    bench_recipe: ClassVar[str | None] = None  # needs plan callables, not a recipe string
    plan: Plan | Sequence[Plan] | Any = field(default=None, repr=False)
    num_tokens: int = 4
    adaptive: bool = True
    max_tokens: int = 10
    confidence: float = 0.3
    search_steps: int = 8

    def validate(self) -> None:
        plans = self.plans()
        if not plans or not all(callable(p) for p in plans):
            raise ConfigError(
                "SelfSpeculative needs plan=callable(model) (or a list of them) returning a context manager "
                "that puts the model in its draft configuration (e.g. applies a skip plan) and undoes it on exit"
            )
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"SelfSpeculative needs 1 <= num_tokens <= max_tokens, got {self.num_tokens}, {self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"SelfSpeculative confidence must be in [0, 1), got {self.confidence}")
        if self.search_steps < 1:
            raise ConfigError(f"SelfSpeculative search_steps must be >= 1, got {self.search_steps}")
        names = [getattr(p, "__name__", f"plan{i}") for i, p in enumerate(plans)]
        self._search = PlanSearch(names)
        if len(plans) == 1:
            self._search.best = 0

    def plans(self) -> list[Plan]:
        if self.plan is None:
            return []
        return list(self.plan) if isinstance(self.plan, list | tuple) else [self.plan]

    @property
    def search(self) -> PlanSearch:
        return self._search

    def drafter_report(self) -> dict[str, Any]:
        return self._search.report()

    def make_drafter(self, model: nn.Module) -> Drafter:
        return SelfSpeculativeDrafter(
            model, self.plans(), self._search, self.search_steps,
            num_tokens=self.num_tokens, confidence=self.confidence, adaptive=self.adaptive,
            max_tokens=self.max_tokens,
        )
