"""Counters of a speculative ``generate``: what was drafted, what was accepted, where time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpeculativeStats:
    """Figures of one ``generate`` call (``speculative_stats(model).last``) or of all calls since the
    transform was applied (``.total``).

    ``drafted``/``accepted`` count draft tokens; ``steps`` counts verification forwards and
    ``row_steps`` the (row, step) pairs of rows still generating; ``tokens`` the tokens emitted.
    ``mean_accepted_length`` is tokens emitted per row per verification forward (accepted drafts
    plus the corrected or bonus token, so 1.0 means no speed-up from drafting).
    """

    calls: int = 0
    steps: int = 0
    row_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0

    def add(self, other: SpeculativeStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["acceptance_rate"] = round(self.acceptance_rate, 4)
        d["mean_accepted_length"] = round(self.mean_accepted_length, 4)
        for k in ("draft_seconds", "verify_seconds", "prefill_seconds"):
            d[k] = round(d[k], 4)
        return d


@dataclass
class StatsRecord:
    """``speculative_stats(model)``: the last call's figures and the running total, and how the last
    call kept its rows (``verify_path``: aligned rows on the engine's cache, or ragged rows with
    masked holes) and ran its draft (``draft_path``: the engine, or the draft's module path and why)."""

    last: SpeculativeStats = field(default_factory=SpeculativeStats)
    total: SpeculativeStats = field(default_factory=SpeculativeStats)
    verify_path: str = "none yet"
    draft_path: str | None = None
    tree_path: str | None = None  # drafts with token trees: verified as trees, or why the first branch only

    def report(self) -> dict[str, object]:
        paths = {"verify rows": self.verify_path} | ({"draft path": self.draft_path} if self.draft_path else {})
        paths |= {"tree verify": self.tree_path} if self.tree_path else {}
        return {"last call": self.last.as_dict(), "all calls": self.total.as_dict(), **paths}
