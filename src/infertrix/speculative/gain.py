"""Never slower than plain decoding: a drafter that measures its own gain and stops drafting when it loses.

A drafter's adaptive length (:mod:`.budget`) models the gain of one step from the acceptance rate
and the verification cost; it misses what the model does not see (Python bookkeeping, a draft
model's catch-up after plain steps, the draft's own forwards at batch > 1) and it keeps drafting
as long as the modelled gain is positive. :class:`GainGuard` wraps any adaptive drafter and
measures the real thing: wall seconds per emitted token of the steps that drafted against those of
plain steps (nothing drafted: one forward of one token per row), from one ``propose`` to the next,
so everything a step costs is counted. When drafting loses, the next steps are plain; drafting is
probed again after a hold that doubles after each probe that still loses (up to ``MAX_HOLD``
steps) and resets when a probe wins; a hold is also long enough that the probe's extra seconds
over plain steps (a draft model's catch-up on the context included) are at most ``PROBE_BUDGET``
of it. Plain steps are re-measured every ``REFRESH`` drafting steps,
since a step's cost grows with the context (every ``MARGINAL_REFRESH`` while the measured gain is
under ``MARGINAL``). A call's first step is not booked as a cost per token (a drafting first step
still counts as a probe and teaches the draft's costs): it carries one-off costs (the first decode
step after the prefill took 47-58 ms against 40-42 for the next ones, SmolLM2 at batch 4); in one
trace it was the call's only plain sample (14.5 ms a token), and the W8A8 self-draft drafted for
the whole call at about 11 ms a token against plain steps' 10.3. What was learnt is kept per batch size in the model's
run-time record, across the calls made while the transform is applied; at the start of a call the hold of a drafter that is cheap
to probe (no draft model to catch up) is shortened, since the new prompt may suit it.

A draft model pays a catch-up before its first draft of a call: its own forward over the whole
prompt, a prefill that no later step repays unless drafting wins. So before that first draft the
guard weighs it against the best case: the call's remaining tokens decoded at the speed-up that
drafting would reach if the draft agreed with the model at ``OPTIMISTIC_RATE`` per position
(:func:`~.budget.best_case_speedup`, from the draft's cost per forward relative to a step: the
weight bytes each reads, or what earlier calls measured). When even that saving is smaller than
the catch-up (estimated as the call's own prefill times the same ratio, or as measured in earlier
calls), or the best case is under ``MIN_SPEEDUP``, the call decodes with plain steps and never
runs the draft; ``describe()`` counts such calls and says why.

Speculative decoding's break-even analysis is Leviathan et al. (ICML 2023,
https://arxiv.org/abs/2211.17192, section 3.4); switching to plain steps when the measured gain is
below 1 is what makes a drafter safe to leave on for every prompt kind.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from torch import nn

from .budget import best_case_speedup
from .drafter import Draft, DraftContext, Drafter

BASE_HOLD = 8  # plain steps after drafting is first found to lose
CATCH_UP_HOLD = 32  # the same for a draft model, whose probes first run it over the skipped tokens
MAX_HOLD = 256  # longest hold between two probes
CALL_START_HOLD = 16  # a new call of a cheap-to-probe drafter probes within this many steps
REFRESH = 64  # drafting steps after which one plain step re-measures the plain cost
MARGINAL = 1.2  # a measured gain below this re-measures the plain cost after MARGINAL_REFRESH steps
MARGINAL_REFRESH = 16
PROBE_BUDGET = 0.02  # a losing probe's extra seconds are at most this share of the hold that follows
SMOOTHING = 0.3  # weight of a new sample in the moving averages
OPTIMISTIC_RATE = 0.9  # per-position acceptance of the best case a catch-up is weighed against
MIN_SPEEDUP = 1.1  # a best case below this cannot repay the probe's own losing steps


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)


@dataclass
class GainState:
    """What :class:`GainGuard` learnt at one batch size: seconds per emitted token of plain steps
    and of drafting steps (moving averages; for drafting, of seconds and of tokens apart), the plain
    steps left before the next probe and the next hold."""

    plain: float | None = None
    spec: float | None = None
    spec_seconds: float | None = None  # moving averages of a drafting step's seconds and tokens
    spec_tokens: float | None = None
    hold: int = 0
    backoff: int = BASE_HOLD
    since_plain: int = 0
    probes: int = 0  # probes that lost (each one started a hold)
    draft_ratio: float | None = None  # measured seconds of a draft forward over those of a plain step
    catch_up_ratio: float | None = None  # measured seconds of the prompt catch-up over the call's prefill
    declined: int = 0  # calls decoded plain because the draft's catch-up could not pay
    why: str | None = None  # the latest such decision

    @property
    def gain(self) -> float | None:
        """Measured speed of drafting steps relative to plain ones (None until both are measured)."""
        if self.plain is None or self.spec is None:
            return None
        return self.plain / self.spec


@dataclass
class GainMemory:
    """One :class:`GainState` per batch size, kept across the calls of one applied transform."""

    states: dict[int, GainState] = field(default_factory=dict)

    def report(self) -> dict[str, object]:
        return {
            f"batch {b}": {"drafting vs plain": None if s.gain is None else round(s.gain, 3), "losing probes": s.probes,
                           **({"calls kept plain": s.declined, "why": s.why} if s.declined else {})}
            for b, s in sorted(self.states.items())
        }


class GainGuard(Drafter):
    """Wraps ``inner`` (an adaptive drafter): drafts through it while drafting is measured to be
    faster per emitted token than plain steps, plain steps otherwise (see the module docstring)."""

    def __init__(self, inner: Drafter, memory: GainMemory):
        self.inner = inner
        self.memory = memory

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        self.inner.start(model, ctx)
        self.state = self.memory.states.setdefault(ctx.batch_size, GainState())
        if not self.inner_catches_up():
            self.state.hold = min(self.state.hold, CALL_START_HOLD)
        self.state.spec = self.state.spec_seconds = self.state.spec_tokens = None  # another prompt: measured afresh
        self.samples = 0  # drafting steps measured in this call
        # the first drafting step of a call (or after a hold) pays a draft model's catch-up on the context
        self.unmeasured = 1 if self.inner_catches_up() else 0
        self.kind: str | None = None  # "plain" or "spec": what the step in flight is
        self.called_inner = False
        self.t0 = 0.0
        self.tokens0 = 0
        self.probe = [0.0, 0]  # seconds and tokens of the drafting steps since the last plain step
        self.check_pending = True  # weigh the best case (and a catch-up) before the call's first draft
        self.first = True  # the call's first step: not booked (one-off costs after the prefill)
        self.declined = False
        self.caught_up = False  # this call's prompt catch-up already learnt from

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        now = time.perf_counter()
        total = sum(len(s) for s in seqs)
        if self.kind is not None and total > self.tokens0:
            if self.first:  # not booked; a drafting step still counts as a probe and teaches its costs
                self.first = False
                if self.kind == "spec":
                    self.unmeasured = max(self.unmeasured, 1)  # (one step: it may be the catch-up step too)
                    self._account(now - self.t0, total - self.tokens0)
            else:
                self._account(now - self.t0, total - self.tokens0)
        self.t0, self.tokens0 = now, total
        st = self.state
        self.called_inner = False
        if self.check_pending:  # before the first draft (or plan search) of the call
            why, decided = self.cannot_repay(limits)
            self.check_pending = not decided
            if why is not None:
                self.declined = True
                st.declined += 1
                st.why = why
        if not self.declined and getattr(self.inner, "measuring", False):  # the drafter's own search: let it run
            self.kind = None
            self.first = False  # the search's steps took the call's one-off costs
            self.called_inner = True
            return self.inner.propose(seqs, limits)
        refresh = MARGINAL_REFRESH if st.gain is not None and st.gain < MARGINAL else REFRESH
        if self.declined or st.hold > 0 or st.plain is None or st.since_plain >= refresh:
            st.hold = max(st.hold - 1, 0)
            self.kind = "plain"
            return Draft([[] for _ in seqs])
        draft = self.inner.propose(seqs, limits)
        self.called_inner = True
        self.kind = "spec" if any(draft.tokens) or getattr(draft, "trees", None) else "plain"
        return draft

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        if self.called_inner:
            self.inner.observe(drafted, accepted)

    def _account(self, seconds: float, tokens: int) -> None:
        """Book the finished step's seconds per token; after a drafting step, decide whether to hold."""
        st = self.state
        if self.kind == "plain":
            st.plain = _ema(st.plain, seconds / tokens)
            st.since_plain = 0
            self.probe = [0.0, 0]
            if not self.called_inner and self.inner_catches_up():
                self.unmeasured = 1
            return
        st.since_plain += 1
        self.probe[0] += seconds
        self.probe[1] += tokens
        self._learn_costs()
        if self.unmeasured:
            self.unmeasured -= 1
            return
        # seconds and tokens averaged apart: one long draft that is rejected outright (many seconds,
        # one token) weighs by its seconds, not by its seconds per token, which would end drafting
        st.spec_seconds = _ema(st.spec_seconds, seconds)
        st.spec_tokens = _ema(st.spec_tokens, float(tokens))
        st.spec = st.spec_seconds / st.spec_tokens
        self.samples += 1
        # one unlucky step (nothing accepted) does not end drafting at the start of a call
        if st.plain is not None and st.spec > st.plain and (self.samples >= 2 or st.probes):
            excess = self.probe[0] - self.probe[1] * st.plain  # what drafting since the last plain step cost
            base = CATCH_UP_HOLD if self.inner_catches_up() else BASE_HOLD
            st.hold = max(st.backoff, base, min(math.ceil(excess / (PROBE_BUDGET * st.plain)), 4 * MAX_HOLD))
            st.backoff = min(2 * max(st.backoff, base), MAX_HOLD)
            st.probes += 1
        else:
            st.backoff = BASE_HOLD

    def _learn_costs(self) -> None:
        """Keep what the draft measured (a forward's seconds against a plain step's, the prompt
        catch-up's against the prefill's) for the next call's :meth:`cannot_repay`."""
        st = self.state
        token = getattr(self.inner, "token_seconds", None)
        if token is not None and st.plain is not None:
            st.draft_ratio = _ema(st.draft_ratio, token / (st.plain * self.ctx.batch_size))
        caught = getattr(self.inner, "prompt_catch_up", None)
        if caught is not None and self.ctx.prefill_seconds and not self.caught_up:
            self.caught_up = True
            st.catch_up_ratio = _ema(st.catch_up_ratio, caught / self.ctx.prefill_seconds)

    def cannot_repay(self, limits: list[int]) -> tuple[str | None, bool]:
        """(why drafting cannot pay even in the best case, or None; whether that is decided: a
        catch-up is weighed once the plain step is measured). Unknown costs are no reason."""
        st = self.state
        ratio = st.draft_ratio if st.draft_ratio is not None else getattr(self.inner, "cost_ratio", None)
        if ratio is None:
            return None, True
        speedup = best_case_speedup(ratio, self.ctx.cost, int(getattr(self.inner, "max_tokens", 8)), OPTIMISTIC_RATE)
        if speedup < MIN_SPEEDUP:
            return (f"a draft forward costs {ratio:.2f} of a step, so even at acceptance {OPTIMISTIC_RATE} drafting "
                    f"would be {speedup:.2f}x plain, under the {MIN_SPEEDUP}x a probe's losing steps need"), True
        if not self.inner_catches_up():
            return None, True
        prefill = self.ctx.prefill_seconds
        live = [lim for lim in limits if lim > 0]
        if prefill is None or st.plain is None or not live:
            return None, False
        saving = (max(live) + 1) * len(live) * st.plain * (1.0 - 1.0 / speedup)
        catch_up = prefill * (st.catch_up_ratio if st.catch_up_ratio is not None else ratio)
        if saving > catch_up:
            return None, True
        return (f"a draft forward costs {ratio:.2f} of a step, so even at acceptance {OPTIMISTIC_RATE} drafting would "
                f"be {speedup:.2f}x plain: {saving:.2f} s saved at most over the call, against {catch_up:.2f} s to run "
                "the draft over the prompt first"), True

    @property
    def path(self) -> str | None:
        """The wrapped drafter's draft path (engine or module), shown in ``describe``."""
        return getattr(self.inner, "path", None)

    def inner_catches_up(self) -> bool:
        return bool(getattr(self.inner, "catches_up", False))


def guarded(drafter: Drafter, memory: GainMemory) -> Drafter:
    """``drafter`` behind a :class:`GainGuard` when it adapts its length (``adaptive``); a drafter
    told to draft a fixed length keeps doing so."""
    return GainGuard(drafter, memory) if getattr(drafter, "adaptive", False) else drafter
