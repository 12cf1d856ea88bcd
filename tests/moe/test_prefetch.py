"""The prefetch worker: it helps, stops cleanly, and surfaces its errors."""

from __future__ import annotations

import threading

import pytest
import torch
from moe_models import make_moe

import infertrix as ix
from infertrix.moe import ExpertOffload, MissPolicy, PrefetchError, offload_runtime

PROMPT = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77, 90, 3, 8, 11]])


def _workers():
    return [t for t in threading.enumerate() if t.name == "infertrix-expert-prefetch"]


def test_prefetch_is_used_and_exact():
    model = make_moe("mixtral", experts=8, num_hidden_layers=4)
    ref = model.generate(PROMPT, max_new_tokens=16, do_sample=False)
    ix.optimize(model, ExpertOffload(budget=0.25, prefetch=True))
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=False), ref)
    st = offload_runtime(model).cache.stats()
    assert st.prefetched > 0 and st.prefetch_used > 0


def test_worker_stops_cleanly_on_restore():
    before = len(_workers())
    model = make_moe("olmoe")
    ix.optimize(model, ExpertOffload(prefetch=True))
    rt = offload_runtime(model)
    assert rt.prefetcher.alive and len(_workers()) == before + 2  # two reader threads
    model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    ix.restore(model)
    assert not rt.prefetcher.alive and len(_workers()) == before


def test_worker_error_surfaces_in_forward():
    model = make_moe("mixtral", num_hidden_layers=4)
    ix.optimize(model, ExpertOffload(budget=0.25, prefetch=True))
    rt = offload_runtime(model)
    store = rt.cache.store
    real = store.read_into

    def failing(layer, expert, gate_up, down):
        if threading.current_thread().name == "infertrix-expert-prefetch":
            raise OSError("disk gone")
        return real(layer, expert, gate_up, down)

    store.read_into = failing
    with pytest.raises((PrefetchError, RuntimeError), match="disk gone|prefetch worker failed"):
        for _ in range(4):
            model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert isinstance(rt.prefetcher.error, OSError)
    for t in rt.prefetcher._threads:
        t.join(5)
    assert not rt.prefetcher.alive  # a failed worker ends; it does not spin
    with pytest.raises(PrefetchError, match="disk gone"):
        with torch.no_grad():
            model(PROMPT)
    store.read_into = real
    ix.restore(model)  # still restorable after the failure


def test_miss_policy_auto_picks_measured_cheaper():
    p = MissPolicy("auto", explore=2)
    seen = {p.decide(1) for _ in range(1)}
    for _ in range(2):
        p.record("fetch", 1, 0.010)
        p.record("in_place", 1, 0.001)
    assert p.decide(1) == "in_place"
    for _ in range(20):
        p.record("in_place", 1, 0.100)
    assert p.decide(1) == "fetch"
    assert seen <= {"fetch", "in_place"}
    # buckets are per token count: prefill decisions are measured separately
    assert p.decide(64) in ("fetch", "in_place")
    assert MissPolicy("in_place").decide(1) == "in_place"
    # and per expert size: a layer of wider (int8) experts is measured on its own
    for _ in range(2):
        p.record("fetch", 1, 0.001, expert_bytes=8192)
        p.record("in_place", 1, 0.050, expert_bytes=8192)
    assert p.decide(1, expert_bytes=8192) == "fetch" and p.decide(1) == "fetch"
    for _ in range(20):
        p.record("fetch", 1, 0.500, expert_bytes=8192)
    assert p.decide(1, expert_bytes=8192) == "in_place" and p.decide(1) == "fetch"
    assert any("8 KiB" in k for k in p.costs())
