"""The skip family's slot of a model's run-time record (:mod:`infertrix.core.state`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.state import family_state
from .calibration import Similarities


@dataclass
class SkipState:
    """What the skip family keeps for one model.

    ``similarities``: calibration measured on this model, by calibration input (so a strategy
    applied to a second model measures that model, and strategies sharing an input share one pass;
    kept until ``restore``, so planning again after a plan is applied reads the model as it was
    measured). ``controller``: AdaSkip's per-prompt controller while AdaSkip is applied (its
    ``plan`` is the last prompt's, ``prefills`` the prompts measured). ``handles``: the
    :class:`~.plan.SkipHandle` of every plan applied to the model now (by a strategy, ``active``,
    AdaSkip's controller), removed by their undo. ``schedule``: SkipDecode's wrapped layers, by
    index: (the wrapper, the layer it wraps, its first skipped position). The decode engine reads
    what is skipped from these two, and the skipped modules from the handles.
    """

    similarities: dict[tuple, tuple[tuple, Similarities]] = field(default_factory=dict)
    controller: Any = None
    handles: list[Any] = field(default_factory=list)
    schedule: dict[int, tuple[nn.Module, nn.Module, int]] = field(default_factory=dict)

    def keep(self, inputs: tuple, sims: Similarities) -> None:
        self.similarities[_key(inputs)] = (inputs, sims)  # holding `inputs` keeps their ids unique

    def lookup(self, inputs: tuple) -> Similarities | None:
        kept = self.similarities.get(_key(inputs))
        return kept[1] if kept else None


def _key(inputs: tuple) -> tuple:
    return tuple(x if isinstance(x, int | float | str | None) else id(x) for x in inputs)


def skip_state(model: nn.Module, create: bool = False) -> SkipState | None:
    return family_state(model, "skip", SkipState if create else None)


def measured_once(model: nn.Module, inputs: tuple, measure: Callable[[], Similarities]) -> Similarities:
    """``measure()`` on ``model`` for these calibration inputs (objects compared by identity), run
    once per model and kept in its record."""
    st = skip_state(model)
    sims = st.lookup(inputs) if st is not None else None
    if sims is None:
        sims = measure()
        skip_state(model, create=True).keep(inputs, sims)
    return sims
