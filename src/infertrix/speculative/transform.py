"""The shared base of every speculative-decoding transform: it makes ``model.generate`` run the
speculative loop through transformers' ``custom_generate`` seam.

A subclass is a dataclass config that only says how to build its :class:`~.drafter.Drafter`;
this base registers the generate hook, switches an sdpa model to ``infertrix_sdpa``
(:mod:`infertrix.core.attention`: a masked verification window attends without copying grouped
keys and values; results unchanged), keeps the statistics in the model's run-time record (read
with :func:`speculative_stats`, also shown by ``describe(model)``) and undoes both on ``restore``. A ``generate`` call that
passes its own ``custom_generate`` or ``assistant_model`` runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..core.attention import use_packed_sdpa
from ..core.generation import add_generate_hook
from ..core.state import state
from ..core.transform import Applied, Stage, Transform
from .drafter import Drafter
from .gain import GainMemory, guarded
from .loop import SpeculativeGenerate
from .state import speculative_state
from .stats import StatsRecord


@dataclass
class SpeculativeDecoding(Transform):
    """Base class: lossless speculative decoding with the drafter that ``make_drafter`` builds."""

    stage = Stage.DECODING
    conflict_group = "decoding"

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        # drafts and verification read replicated token ids and logits: the same on every rank, unless
        # a draft's length follows measured times (the adaptive length and the never-slower guard)
        if getattr(self, "adaptive", False):
            return ("adaptive draft lengths and the never-slower guard follow measured times, which differ "
                    "between ranks (their forwards would stop matching); give adaptive=false, e.g. "
                    "pld(adaptive=false)")
        return None

    def make_drafter(self, model: nn.Module) -> Drafter:
        raise NotImplementedError(f"{type(self).__name__}.make_drafter")

    def drafter_report(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def held_tensors(self, model: nn.Module) -> list[Tensor]:
        """Tensors the drafter keeps alive for ``model`` (a draft's own weights), for describe."""
        return []

    def gain_memory(self, model: nn.Module) -> GainMemory:
        """What the never-slower guard (:mod:`.gain`) measured on ``model``, kept in its run-time
        record across the calls made while the transform is applied."""
        st = speculative_state(model, create=True)
        if st.gain is None:
            st.gain = GainMemory()
        return st.gain

    def apply(self, model: nn.Module) -> Applied:
        record = StatsRecord()
        memory = self.gain_memory(model)  # adaptive drafters fall back to plain steps when they lose
        loop = SpeculativeGenerate(lambda: guarded(self.make_drafter(model), memory), record)

        def hook(m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if kwargs.get("custom_generate") is not None or kwargs.get("assistant_model") is not None:
                return args, kwargs
            kwargs = dict(kwargs)
            kwargs["custom_generate"] = loop
            # generate() drops its `streamer` argument for custom_generate callables; pass it on
            # under a name our loop's signature declares.
            if kwargs.get("streamer") is not None:
                kwargs["infertrix_streamer"] = kwargs.pop("streamer")
            return args, kwargs

        remove = add_generate_hook(model, hook, order=int(self.stage))
        speculative_state(model, create=True).stats = record
        # verification forwards are masked query windows: no per-step copies of grouped keys/values
        undo_attention = use_packed_sdpa(model)

        def undo() -> None:
            undo_attention()
            remove()
            drop_speculative_state(model)

        def report() -> dict[str, Any]:
            gain = {"drafting vs plain (measured)": memory.report()} if memory.states else {}
            return {**self.drafter_report(model), **record.report(), **gain}

        return Applied(self, undo=undo, report=report,
                       held=lambda: self.held_tensors(model))


def drop_speculative_state(model: nn.Module) -> None:
    """Forget what the speculative family kept for ``model`` (its statistics, a prepared draft)."""
    st = state(model)
    if st is not None:
        st.speculative = None


def speculative_stats(model: nn.Module) -> StatsRecord:
    """The statistics of a model with a speculative transform applied: ``.last`` (the last
    ``generate`` call) and ``.total`` (all calls since it was applied)."""
    st = speculative_state(model)
    record = st.stats if st is not None else None
    if record is None:
        raise ValueError("no speculative transform is applied to this model; optimize(model, PromptLookup()) first")
    return record
