"""Never slower than plain decoding: the GainGuard switches a losing drafter to plain steps, probes
back with a doubling hold, resumes when drafting wins, and keeps outputs identical."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_spec_greedy_identity import padded_batch, plain_and_spec

import infertrix as ix
from infertrix.speculative import DraftModel, PromptLookup, gain
from infertrix.speculative.drafter import Draft, DraftContext, Drafter
from infertrix.speculative.gain import BASE_HOLD, GainGuard, GainMemory, guarded


class Scripted(Drafter):
    """Drafts 4 tokens whenever asked; counts its calls."""

    adaptive = True

    def __init__(self):
        self.calls = 0

    def propose(self, seqs, limits):
        self.calls += 1
        return Draft([[7] * 4 for _ in seqs])


def run_steps(guard: GainGuard, clock: list[float], steps: int, spec_seconds: float, spec_tokens: int) -> list[str]:
    """Drive the guard like the loop does: plain steps take 1 s for one token, drafting steps
    ``spec_seconds`` for ``spec_tokens`` tokens. Returns the kind of each step."""
    seq = [1, 2, 3]
    kinds = []
    for _ in range(steps):
        draft = guard.propose([list(seq)], [10])
        spec = bool(draft.tokens[0])
        kinds.append("spec" if spec else "plain")
        clock[0] += spec_seconds if spec else 1.0
        n = spec_tokens if spec else 1
        guard.observe([4 if spec else 0], [n - 1 if spec else 0])
        seq.extend([5] * n)
    return kinds


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gain.time, "perf_counter", lambda: now[0])
    return now


def start(guard: GainGuard) -> None:
    guard.start(None, DraftContext(False, 1, 0, lambda x: x))


def test_guard_holds_a_losing_drafter_with_doubling_probes(clock):
    inner = Scripted()
    guard = GainGuard(inner, GainMemory())
    start(guard)
    kinds = run_steps(guard, clock, 120, spec_seconds=3.0, spec_tokens=2)  # 1.5 s per token vs 1 s
    spec_steps = [i for i, k in enumerate(kinds) if k == "spec"]
    assert kinds[0] == "plain"  # the plain cost is measured first
    assert len(spec_steps) <= 6  # 2 to decide, then one probe per hold
    gaps = [b - a for a, b in zip(spec_steps[1:], spec_steps[2:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] >= 4 * BASE_HOLD  # the hold doubles
    st = guard.memory.states[1]
    assert st.gain is not None and st.gain < 1


def test_guard_keeps_a_winning_drafter_and_resumes(clock):
    memory = GainMemory()
    guard = GainGuard(Scripted(), memory)
    start(guard)
    kinds = run_steps(guard, clock, 100, spec_seconds=1.5, spec_tokens=4)  # 0.375 s per token
    assert kinds.count("plain") <= 2 + 100 // gain.REFRESH + 1  # the call's first two steps, re-measurements
    # the same memory, a prompt where drafting loses, then one where it wins again
    losing = run_steps(guard, clock, 40, spec_seconds=4.0, spec_tokens=1)
    assert losing.count("plain") > 30
    guard2 = GainGuard(Scripted(), memory)
    start(guard2)  # a new call of a cheap drafter probes within CALL_START_HOLD steps
    kinds = run_steps(guard2, clock, 60, spec_seconds=1.5, spec_tokens=4)
    assert kinds[gain.CALL_START_HOLD + 2 :].count("spec") > 30


def test_a_catch_up_step_is_not_counted_against_drafting(clock):
    """A draft model's first drafting step also runs the draft over the skipped context (the whole
    prompt on a call's first draft); the guard leaves it out, so a drafter that wins on every
    later step keeps drafting (the quantized self-draft on the engine was held back by it)."""
    from infertrix.speculative.draft_model import DraftModelDrafter

    assert GainGuard(DraftModelDrafter.__new__(DraftModelDrafter), GainMemory()).inner_catches_up()

    class CatchingUp(Scripted):
        catches_up = True

        def propose(self, seqs, limits):
            clock[0] += 6.0 if self.calls == 0 else 0.0  # the first draft reads the whole prompt
            return super().propose(seqs, limits)

    guard = GainGuard(CatchingUp(), GainMemory())
    start(guard)
    kinds = run_steps(guard, clock, 40, spec_seconds=1.5, spec_tokens=4)  # 0.375 s per token after it
    assert kinds.count("spec") > 30
    no_skip = GainGuard(CatchingUp(), GainMemory())
    no_skip.inner.catches_up = False  # counted, the catch-up step alone makes drafting look slower
    start(no_skip)
    assert run_steps(no_skip, clock, 40, spec_seconds=1.5, spec_tokens=4).count("spec") < 10


def test_one_rejected_long_draft_does_not_end_a_winning_drafter(clock):
    """Every fifth drafting step is a long draft rejected outright (2.5 s for one token); the others
    take 1.5 s for 5 tokens: 0.5 s per token overall, twice plain's speed, so drafting goes on."""
    guard = GainGuard(Scripted(), GainMemory())
    start(guard)
    seq, kinds, n_spec = [1, 2, 3], [], 0
    for _ in range(60):
        spec = bool(guard.propose([list(seq)], [10]).tokens[0])
        kinds.append("spec" if spec else "plain")
        bad = spec and n_spec % 5 == 4
        n_spec += spec
        clock[0] += (2.5 if bad else 1.5) if spec else 1.0
        n = (1 if bad else 5) if spec else 1
        guard.observe([4 if spec else 0], [n - 1])
        seq.extend([5] * n)
    assert kinds.count("plain") <= 2, kinds  # the unbooked first step and the one that measures plain
    assert guard.memory.states[1].gain > 1.5


def test_the_first_step_of_a_call_is_not_the_plain_cost(clock):
    """The first decode step after the prefill carries one-off costs (47-58 ms against 40-42 for the
    next ones, SmolLM2 at batch 4). Booked as the plain cost, it makes a drafter 15% slower per
    token here look faster for the whole call; the guard leaves it out and holds the drafter."""
    guard = GainGuard(Scripted(), GainMemory())
    start(guard)
    seq, kinds = [1, 2, 3], []
    for step in range(60):
        spec = bool(guard.propose([list(seq)], [10]).tokens[0])
        kinds.append("spec" if spec else "plain")
        clock[0] += (2.3 if spec else 1.0) + (0.6 if step == 0 else 0.0)  # 1.15 s per token drafting
        n = 2 if spec else 1
        guard.observe([4 if spec else 0], [n - 1 if spec else 0])
        seq.extend([5] * n)
    assert kinds[:2] == ["plain", "plain"]  # the first step unbooked, the second measures plain
    assert kinds.count("spec") <= 4, kinds  # 2 to decide, then probes
    assert guard.memory.states[1].gain < 1


def test_a_call_that_starts_drafting_does_not_book_its_first_step(clock):
    """A later call (the plain cost known) drafts at once; its first step's one-off costs count
    as a probe, not as the drafter's cost per token, so a winning drafter keeps drafting."""
    memory = GainMemory()
    first = GainGuard(Scripted(), memory)
    start(first)
    run_steps(first, clock, 20, spec_seconds=1.5, spec_tokens=4)
    guard = GainGuard(Scripted(), memory)
    start(guard)
    seq, kinds = [1, 2, 3], []
    for step in range(30):
        spec = bool(guard.propose([list(seq)], [10]).tokens[0])
        kinds.append("spec" if spec else "plain")
        clock[0] += (1.5 if spec else 1.0) + (4.0 if step == 0 else 0.0)  # a slow first step: 5.5 s, 4 tokens
        n = 4 if spec else 1
        guard.observe([4 if spec else 0], [n - 1 if spec else 0])
        seq.extend([5] * n)
    assert kinds[0] == "spec" and kinds.count("spec") >= 28, kinds
    assert guard.state.probes == 0 and guard.state.gain > 2


def test_a_marginal_gain_re_measures_plain_sooner(clock):
    guard = GainGuard(Scripted(), GainMemory())
    start(guard)
    kinds = run_steps(guard, clock, 100, spec_seconds=1.8, spec_tokens=2)  # 0.9 s per token: gain 1.11
    assert kinds.count("plain") >= 2 + 90 // (gain.MARGINAL_REFRESH + 1)
    assert kinds.count("spec") > 80


def test_only_adaptive_drafters_are_guarded():
    assert isinstance(guarded(Scripted(), GainMemory()), GainGuard)
    fixed = Scripted()
    fixed.adaptive = False
    assert guarded(fixed, GainMemory()) is fixed


def truncated(model, keep):
    import copy

    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:keep]
    draft.config.num_hidden_layers = keep
    return draft


@pytest.mark.parametrize("batch", [1, 4])
def test_guarded_drafters_stay_identical_and_remember_across_calls(batch):
    model = make_tiny("llama", num_hidden_layers=4)
    ids, mask = padded_batch(batch, seed=batch)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40)
    t = DraftModel(draft=truncated(model, 2))
    ix.optimize(model, t)
    try:
        for _ in range(2):
            assert torch.equal(ref, model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40))
        assert batch in t.gain_memory(model).states  # kept in the model's record across calls
        assert "drafting vs plain (measured)" in ix.describe(model).transforms[0]["report"]
    finally:
        ix.restore(model)
    ref2, out, _ = plain_and_spec(model, PromptLookup(), ids, mask, max_new_tokens=40)
    assert torch.equal(ref2, out)


class Priced(Scripted):
    """A draft model: catches up on the prompt before its first draft, costs ``ratio`` of a step."""

    catches_up = True

    def __init__(self, ratio):
        super().__init__()
        self.cost_ratio = ratio


@pytest.mark.parametrize(("ratio", "prefill", "drafts"), [
    (0.74, 2.0, False),  # even at acceptance 0.9 drafting would gain under MIN_SPEEDUP
    (0.3, 20.0, False),  # it could gain, but not the 6 s its catch-up over the prompt would take
    (0.3, 2.0, True),  # 0.6 s of catch-up, up to ~4 s to save over the 11 tokens left: probed
])
def test_a_draft_whose_catch_up_cannot_pay_is_never_run(clock, ratio, prefill, drafts):
    memory = GainMemory()
    guard = GainGuard(Priced(ratio), memory)
    guard.start(None, DraftContext(False, 1, 0, lambda x: x, prefill_seconds=prefill))
    kinds = run_steps(guard, clock, 30, spec_seconds=1.5, spec_tokens=4)
    assert (guard.inner.calls > 0) is drafts
    assert ("spec" in kinds) is drafts
    report = memory.report()["batch 1"]
    assert (report.get("calls kept plain") == 1) is not drafts
    if not drafts:
        assert ("over the prompt" in report["why"]) is (prefill > 5)  # the catch-up, or the best case itself


def test_measured_draft_costs_replace_the_estimate_on_the_next_call(clock):
    """A draft that looked cheap by its bytes but measured dear is not run over the next prompt."""
    memory = GainMemory()
    st = memory.states.setdefault(1, gain.GainState())
    st.plain, st.draft_ratio, st.catch_up_ratio = 1.0, 0.9, 0.9  # what an earlier call measured
    guard = GainGuard(Priced(0.3), memory)
    guard.start(None, DraftContext(False, 1, 0, lambda x: x, prefill_seconds=2.0))
    assert "spec" not in run_steps(guard, clock, 10, spec_seconds=1.5, spec_tokens=4)
    assert guard.inner.calls == 0


def test_self_speculation_that_skips_too_little_is_never_run():
    """Skipping one of four layers leaves a draft forward at about 0.76 of a step: even at acceptance
    0.9 it cannot reach the guard's 1.1x, so neither the plan search nor any draft runs; on six
    layers, skipping three (at most half the decoder may go) is probed as usual."""
    from infertrix.skip import UniformSkip
    from infertrix.speculative import SelfSpeculative

    ids, mask = padded_batch(1, seed=4)
    for layers, count, runs in ((4, 1, False), (6, 3, True)):
        model = make_tiny("llama", num_hidden_layers=layers)
        t = SelfSpeculative(plan=UniformSkip(count=count), confidence=0.0)
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
        ix.optimize(model, t)
        try:
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
            stats = ix.speculative.speculative_stats(model).last
            report = t.gain_memory(model).report()["batch 1"]
        finally:
            ix.restore(model)
        assert torch.equal(ref, out)
        assert (stats.drafted > 0) is runs
        assert ("calls kept plain" in report) is not runs
