"""``ExpertCache``: a fixed budget of experts in fast memory, per layer, with LRU or LFU eviction.

Each MoE layer gets ``capacity`` slots: two preallocated tensors ``[capacity, 2I, H]`` and
``[capacity, H, I]`` on the compute device, so the cache can never hold more than its budget
(it has nowhere to put more) and a fetch is a read straight into a slot, with no allocation.
Per-layer slots follow mixtral-offloading (Eliseev & Mazur 2023, arXiv:2312.17238): a global
pool shared by all layers thrashes under LRU, because the layers are visited in a fixed cycle.

Policies: ``"lru"`` evicts the least recently used expert; ``"lfu"`` the least frequently used
over the whole run (counts survive eviction, as in MoE-Infinity's activation-aware caching, Xue
et al. 2024, arXiv:2401.14361), ties broken by recency.

Statistics (:class:`LayerStats`) are kept per layer; their sums are the global figures
``describe(model)`` shows. They add up by construction: ``hits + misses == requests`` and
``misses == fetched + computed_in_place``.

Budgets count bytes: a slot holds one expert as the store keeps it, so with low-bit experts
(``ExpertStore(bits=8/4)``, EdgeMoE) a slot is a page-aligned byte blob of a quarter of a float32
expert or less, and the same bytes hold that many more experts (each layer's capacity is computed
from its experts' bytes, ``ExpertStore.bytes_of``, by ``ExpertOffload``; a store whose layers have
different widths gives each layer slots of its own width and count, ``capacities``).

Thread safety: one lock guards the slot tables; the prefetch worker reserves a slot under the
lock, then reads into it without the lock while the slot is marked loading (never a victim).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..core.transform import ConfigError
from .expert_files import aligned_empty
from .miss_policy import MissPolicy
from .store import ExpertStore

POLICIES = ("lru", "lfu")


@dataclass
class LayerStats:
    """Counters of one MoE layer (or, summed, of the model)."""

    requests: int = 0  # (forward call, expert) pairs the router asked for
    hits: int = 0  # resident, or already being loaded by the prefetcher, when asked for
    misses: int = 0  # not resident when asked for
    fetched: int = 0  # misses loaded into the cache on demand
    computed_in_place: int = 0  # misses computed where stored (Fiddler), not cached
    prefetched: int = 0  # loads issued by the prefetcher
    prefetch_used: int = 0  # prefetched experts asked for before being evicted
    waited_on_prefetch: int = 0  # hits whose prefetch was still in flight
    evictions: int = 0
    bytes_read: int = 0  # bytes read from the store (on demand and prefetch)
    read_seconds: float = 0.0  # time spent reading (either thread)
    stall_seconds: float = 0.0  # time the forward pass waited for experts to arrive

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def add(self, other: LayerStats) -> LayerStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = round(self.hit_rate, 4)
        return d


@dataclass
class _Slot:
    expert: int = -1
    ready: threading.Event = field(default_factory=threading.Event)
    loading: bool = False
    pins: int = 0
    prefetched: bool = False  # loaded by the prefetcher and not yet asked for
    error: BaseException | None = None


class ExpertHandle:
    """One expert's weights for one use; call ``release()`` (or use ``with``) when done. Float
    experts: ``gate_up``, ``down``; low-bit experts: ``parts`` (the format's typed views)."""

    __slots__ = ("gate_up", "down", "parts", "kind", "_release")

    def __init__(self, gate_up: torch.Tensor | None, down: torch.Tensor | None, kind: str, release,
                 parts: dict[str, torch.Tensor] | None = None):
        self.gate_up, self.down, self.kind, self._release = gate_up, down, kind, release
        self.parts = parts

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> ExpertHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LayerCache:
    """The slots of one MoE layer."""

    def __init__(self, owner: ExpertCache, layer: int, capacity: int):
        store = owner.store
        self.owner, self.layer, self.capacity = owner, layer, capacity
        # one tensor per slot_shapes() entry, [capacity, ...]: float gate_up and down, or low-bit blobs
        if owner.device.type == "cpu":  # page-aligned slots: the store reads into them with O_DIRECT
            self.buffers = [aligned_empty((capacity, *shape), dtype) for shape, dtype in store.slot_shapes(layer)]
        else:
            self.buffers = [torch.empty((capacity, *shape), dtype=dtype, device=owner.device)
                            for shape, dtype in store.slot_shapes(layer)]
        self.format = fmt = store.format_of(layer)
        self.expert_bytes = store.bytes_of(layer)
        # low-bit: each slot's typed views, made once (a handle per use would cost ~8 views)
        self.parts = None if fmt is None else [fmt.views(self.buffers[0][i]) for i in range(capacity)]
        self.slots = [_Slot() for _ in range(capacity)]
        self.slot_of: dict[int, int] = {}
        self.recency: OrderedDict[int, None] = OrderedDict()  # resident experts, oldest first
        self.counts = [0] * store.num_experts  # LFU: uses over the whole run
        self.stats = LayerStats()

    @property
    def gate_up(self) -> torch.Tensor:
        return self.buffers[0]

    @property
    def down(self) -> torch.Tensor:
        return self.buffers[1]

    def handle(self, slot: int, kind: str, release) -> ExpertHandle:
        if self.parts is not None:
            return ExpertHandle(None, None, kind, release, self.parts[slot])
        return ExpertHandle(self.buffers[0][slot], self.buffers[1][slot], kind, release)

    # -- under owner.lock -------------------------------------------------------------------
    def _victim(self) -> int | None:
        free = [i for i, s in enumerate(self.slots) if s.expert < 0 and not s.loading]
        if free:
            return free[0]
        candidates = [e for e in self.recency if not self.slots[self.slot_of[e]].loading and not self.slots[self.slot_of[e]].pins]
        if not candidates:
            return None
        if self.owner.policy == "lfu":
            order = {e: i for i, e in enumerate(self.recency)}
            victim = min(candidates, key=lambda e: (self.counts[e], order[e]))
        else:
            victim = candidates[0]
        slot = self.slot_of.pop(victim)
        del self.recency[victim]
        self.slots[slot].expert = -1
        self.slots[slot].ready.clear()
        self.slots[slot].prefetched = False
        self.stats.evictions += 1
        return slot

    def _reserve(self, expert: int, prefetched: bool) -> int | None:
        slot = self._victim()
        if slot is None:
            return None
        s = self.slots[slot]
        s.expert, s.loading, s.prefetched, s.error = expert, True, prefetched, None
        s.ready.clear()
        self.slot_of[expert] = slot
        self.recency[expert] = None
        return slot

    def _forget(self, slot: int) -> None:
        s = self.slots[slot]
        if s.expert >= 0 and self.slot_of.get(s.expert) == slot:
            del self.slot_of[s.expert]
            self.recency.pop(s.expert, None)
        s.expert, s.loading, s.prefetched = -1, False, False

    # -- loading (no lock held) -------------------------------------------------------------
    def _load(self, slot: int, expert: int) -> None:
        s = self.slots[slot]
        t0 = time.perf_counter()
        try:
            n = self.owner.store.read_into(self.layer, expert, *(b[slot] for b in self.buffers))
            if self.owner.device.type == "cuda":
                torch.cuda.current_stream(self.owner.device).synchronize()
        except BaseException as exc:
            with self.owner.lock:
                s.error = exc
                self._forget(slot)
                s.ready.set()
            raise
        dt = time.perf_counter() - t0
        with self.owner.lock:
            self.stats.bytes_read += n if n else self.expert_bytes
            self.stats.read_seconds += dt
            s.loading = False
            s.ready.set()
        self.owner.miss_policy.record_fetch(dt)

    def resident(self) -> list[int]:
        with self.owner.lock:
            return sorted(e for e, i in self.slot_of.items() if not self.slots[i].loading)


class ExpertCache:
    """``capacity`` experts per MoE layer in fast memory, filled from an :class:`ExpertStore`."""

    def __init__(
        self,
        store: ExpertStore,
        capacity: int | dict[int, int],
        policy: str = "lru",
        device: torch.device | str = "cpu",
        miss_policy: MissPolicy | None = None,
        top_k: int = 1,
    ):
        if policy not in POLICIES:
            raise ConfigError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        caps = capacity if isinstance(capacity, dict) else dict.fromkeys(store.layers, capacity)
        if min(caps.values()) < top_k:
            raise ConfigError(
                f"an expert budget of {min(caps.values())} per layer is smaller than top-k={top_k}: one token "
                f"needs {top_k} experts at once; raise the budget to at least {top_k} experts per layer"
            )
        #: resident experts per layer (layers of wider experts may hold fewer in the same bytes)
        self.capacities = {i: min(caps[i], store.num_experts) for i in store.layers}
        self.capacity = max(self.capacities.values())
        self.store, self.policy = store, policy
        self.device = torch.device(device)
        self.miss_policy = miss_policy or MissPolicy("fetch")
        self.lock = threading.Lock()
        self.layers = {i: LayerCache(self, i, self.capacities[i]) for i in store.layers}

    @property
    def budget_bytes(self) -> int:
        """Bytes of fast memory the cache may use (all slots of all layers)."""
        return sum(lc.capacity * lc.expert_bytes for lc in self.layers.values())

    def resident_bytes(self) -> int:
        with self.lock:
            return sum(len(lc.slot_of) * lc.expert_bytes for lc in self.layers.values())

    def acquire(self, layer: int, expert: int, n_tokens: int = 1) -> ExpertHandle:
        """The weights of ``expert`` for one use by the forward pass (main thread)."""
        lc = self.layers[layer]
        t0 = time.perf_counter()
        with self.lock:
            lc.stats.requests += 1
            lc.counts[expert] += 1
            slot = lc.slot_of.get(expert)
            if slot is not None:
                s = lc.slots[slot]
                lc.stats.hits += 1
                if s.prefetched:
                    lc.stats.prefetch_used += 1
                    s.prefetched = False
                waiting = s.loading
                if waiting:
                    lc.stats.waited_on_prefetch += 1
                s.pins += 1
                lc.recency.move_to_end(expert)
                kind = "hit"
            else:
                lc.stats.misses += 1
                kind = self.miss_policy.decide(n_tokens, lc.expert_bytes)
                if kind == "fetch":
                    slot = lc._reserve(expert, prefetched=False)
                    if slot is None:  # every slot pinned or loading: compute where stored
                        kind = "in_place"
                    else:
                        lc.slots[slot].pins += 1
                        lc.stats.fetched += 1
                if kind == "in_place":
                    lc.stats.computed_in_place += 1
        if kind == "in_place":
            stored = self.store.view(layer, expert)
            release = lambda: self.store.release(layer, expert)  # noqa: E731
            if lc.format is not None:
                return ExpertHandle(None, None, kind, release, lc.format.views(stored[0]))
            return ExpertHandle(*stored, kind, release)
        s = lc.slots[slot]
        if kind == "fetch":
            try:
                lc._load(slot, expert)
            except BaseException:
                with self.lock:
                    s.pins -= 1
                raise
        elif waiting:
            s.ready.wait()
        if s.error is not None and s.expert != expert:
            err = s.error
            with self.lock:
                s.pins -= 1
            raise RuntimeError(f"loading expert {expert} of layer {layer} failed: {err!r}") from err
        if kind != "hit" or waiting:
            with self.lock:
                lc.stats.stall_seconds += time.perf_counter() - t0

        def release() -> None:
            with self.lock:
                s.pins -= 1

        return lc.handle(slot, kind, release)

    def prefetch(self, layer: int, expert: int) -> bool:
        """Load ``expert`` if absent (prefetch worker); False when resident or no slot is free."""
        lc = self.layers[layer]
        with self.lock:
            if expert in lc.slot_of:  # predicted and resident: protect it from this round's loads
                lc.recency.move_to_end(expert)
                return False
            slot = lc._reserve(expert, prefetched=True)
            if slot is None:
                return False
            lc.stats.prefetched += 1
        lc._load(slot, expert)
        return True

    def stats(self) -> LayerStats:
        total = LayerStats()
        with self.lock:
            for lc in self.layers.values():
                total.add(lc.stats)
        return total

    def layer_stats(self) -> dict[int, LayerStats]:
        with self.lock:
            return {i: LayerStats(**asdict(lc.stats)) for i, lc in self.layers.items()}

    def reset_stats(self) -> None:
        with self.lock:
            for lc in self.layers.values():
                lc.stats = LayerStats()

    def max_resident_per_layer(self) -> int:
        with self.lock:
            return max(len(lc.slot_of) for lc in self.layers.values())
