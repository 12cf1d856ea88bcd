"""The speculative family's slot of a model's run-time record (:mod:`infertrix.core.state`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.state import family_state
from ..core.transform import Transform
from .stats import StatsRecord


@dataclass
class SpeculativeState:
    """What speculative decoding keeps for one model.

    ``stats``: the applied transform's counters (read with :func:`~.transform.speculative_stats`).
    ``prepared``: what a transform built for this model once and its drafter reuses (QuantizedSelf's
    quantized copy, SelfSpeculative's resolved plans and their search), with the transform it was
    built for: another configuration builds afresh. ``lean``: on a draft model, its engine
    :class:`~infertrix.engine.runner.Runner` (or None) with the module ids it was built from. ``gain``: what the
    never-slower guard measured (:class:`~.gain.GainMemory`), kept across calls while applied.
    """

    stats: StatsRecord | None = None
    gain: Any = None
    prepared: tuple[Transform, Any] | None = None
    lean: tuple[tuple[int, ...], Any] | None = None


def speculative_state(model: nn.Module, create: bool = False) -> SpeculativeState | None:
    return family_state(model, "speculative", SpeculativeState if create else None)


def prepared(model: nn.Module, transform: Transform) -> Any | None:
    """What this configuration of ``transform`` prepared for ``model`` (None when nothing yet)."""
    st = speculative_state(model)
    if st is None or st.prepared is None or st.prepared[0] != transform:
        return None
    return st.prepared[1]


def prepared_for(model: nn.Module, transform: Transform, build: Callable[[], Any]) -> Any:
    """``build()``'s result for ``model`` and this configuration of ``transform``, built once and
    kept in the model's record (dropped when the transform is undone)."""
    kept = prepared(model, transform)
    if kept is None:
        kept = build()
        speculative_state(model, create=True).prepared = (transform, kept)
    return kept
