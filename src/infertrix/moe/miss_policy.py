"""What to do on a cache miss: fetch the expert into the cache, or compute it where it is stored.

Fiddler (Kamahori et al. 2024, arXiv:2402.07033) observed that moving an expert's weights can
cost more than computing the expert where the weights already are (on the CPU, for a GPU
system). ``MissPolicy("auto")`` decides from measured costs instead of a fixed rule: it keeps an
exponential moving average of the seconds one on-demand use took under each strategy, per
token-count bucket (1 token, 2-3, 4-7, ...; a fetch's cost is mostly fixed, an in-place
compute's grows with the tokens) and expert size (layers of int8 and int4 experts move and compute
different bytes), tries each strategy a few times per bucket first, then picks the cheaper. ``"fetch"`` and ``"in_place"`` force one strategy.

On this project's CPU tier (disk -> memory), "in place" means computing on the memory-mapped
file (the reads happen as page faults) and not admitting the expert, so it never evicts a
useful one; with ``tier="host"`` it is a zero-copy compute on host memory.
"""

from __future__ import annotations

import threading

from ..core.transform import ConfigError

MODES = ("fetch", "in_place", "auto")


def _bucket(n_tokens: int) -> int:
    return max(0, int(n_tokens).bit_length() - 1)


class MissPolicy:
    """Fetch / compute-in-place decisions from measured costs (see the module docstring)."""

    def __init__(self, mode: str = "fetch", explore: int = 2, alpha: float = 0.2):
        if mode not in MODES:
            raise ConfigError(f"miss policy must be one of {MODES}, got {mode!r}")
        self.mode, self.explore, self.alpha = mode, explore, alpha
        self._lock = threading.Lock()
        self._cost: dict[tuple[str, int, int], float] = {}  # (strategy, token bucket, expert bytes)
        self._count: dict[tuple[str, int, int], int] = {}
        self.fetch_read_seconds = 0.0  # EMA of one expert's read, whoever read it

    def decide(self, n_tokens: int, expert_bytes: int = 0) -> str:
        if self.mode != "auto":
            return self.mode
        b = _bucket(n_tokens)
        with self._lock:
            nf, ni = self._count.get(("fetch", b, expert_bytes), 0), self._count.get(("in_place", b, expert_bytes), 0)
            if nf < self.explore or ni < self.explore:
                return "fetch" if nf <= ni else "in_place"
            cheaper = self._cost[("fetch", b, expert_bytes)] <= self._cost[("in_place", b, expert_bytes)]
            return "fetch" if cheaper else "in_place"

    def record(self, kind: str, n_tokens: int, seconds: float, expert_bytes: int = 0) -> None:
        """Record the measured seconds of one miss served by ``kind`` (read + compute)."""
        key = (kind, _bucket(n_tokens), expert_bytes)
        with self._lock:
            n = self._count.get(key, 0)
            old = self._cost.get(key, seconds)
            self._cost[key] = seconds if n == 0 else (1 - self.alpha) * old + self.alpha * seconds
            self._count[key] = n + 1

    def record_fetch(self, seconds: float) -> None:
        with self._lock:
            a = self.alpha
            self.fetch_read_seconds = seconds if not self.fetch_read_seconds else (1 - a) * self.fetch_read_seconds + a * seconds

    def costs(self) -> dict[str, float]:
        """Measured mean seconds per miss, by strategy and token bucket (for describe)."""
        with self._lock:
            sizes = {w for (_k, _b, w) in self._cost}
            return {f"{k} ms/miss [{2**b}+ tok{'' if len(sizes) < 2 else f', {w // 1024} KiB'}]": round(v * 1e3, 3)
                    for (k, b, w), v in sorted(self._cost.items())}
