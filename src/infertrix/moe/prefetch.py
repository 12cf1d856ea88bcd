"""Prefetch: guess the next MoE layer's experts from the current hidden state, load them early.

While layer ``i``'s experts compute, a background thread loads the experts that layer ``i+1``'s
router would pick if its input were the current residual stream: ``router_{i+1}(norm_{i+1}(h_i))``
where ``h_i`` is layer ``i``'s residual after attention. The residual changes little from one
layer to the next, so this guess is usually right (Fate, arXiv:2502.12224; ExpertFlow,
arXiv:2410.17954; MoE-Infinity, arXiv:2401.14361 use the same cross-layer signal). Wrong guesses
cost a load and a slot; the expert actually routed to is then fetched on demand.

The worker reads with ``os.preadv``, which releases the GIL, so reads overlap the matrix
products of the current layer. It stops cleanly (``stop()`` joins it) and an exception in the
worker is kept and raised, as :class:`PrefetchError`, by the next forward pass.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter

import torch
import torch.nn.functional as F

from .cache import ExpertCache
from .discovery import MoELayer


class PrefetchError(RuntimeError):
    """The prefetch worker failed; the cause is chained."""


class Prefetcher:
    """A daemon thread that loads (layer, expert) jobs into an :class:`ExpertCache`."""

    def __init__(self, cache: ExpertCache, threads: int = 2, name: str = "infertrix-expert-prefetch"):
        self.cache = cache
        self.error: BaseException | None = None
        self.step = 0  # the main thread's position (MoE layers entered so far)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # two readers keep two requests in flight: the storage serves them in parallel, and the
        # expert needed first does not wait behind the other
        self._threads = [threading.Thread(target=self._run, name=name, daemon=True) for _ in range(threads)]
        self._stopped = False
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def submit(self, layer: int, experts: list[int], target_step: int) -> None:
        """Queue loads for ``layer``, useless once the main thread has gone past ``target_step``."""
        if self._stopped:
            return
        for e in experts:
            self._queue.put((layer, e, target_step))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            layer, expert, target = job
            if self.step > target:  # the forward pass already went past that layer
                continue
            try:
                self.cache.prefetch(layer, expert)
            except BaseException as exc:  # kept and re-raised in the main thread
                self.error = exc
                self._stopped = True
                self._queue.put(None)  # wake the other reader so it ends too
                return

    def check(self) -> None:
        """Raise the worker's error, if it had one."""
        if self.error is not None:
            raise PrefetchError(
                f"the expert prefetch worker failed: {self.error!r}; restore(model) and check the expert "
                "store (its files must stay readable), or apply ExpertOffload(prefetch=False)"
            ) from self.error

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (pending jobs are dropped) and wait for it to finish."""
        self._stopped = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        if self.alive:
            raise RuntimeError(f"the expert prefetch worker did not stop within {timeout} s")


def predict_experts(hidden: torch.Tensor, nxt: MoELayer, limit: int) -> list[int]:
    """The experts ``nxt``'s router picks for ``hidden`` (residual stream): for one token in
    ascending id order (the order the forward pass uses them), else the ``limit`` most used."""
    with torch.no_grad():
        x = hidden.reshape(-1, hidden.shape[-1])
        if nxt.norm is not None:
            x = nxt.norm(x)
        logits = F.linear(x.to(nxt.router.weight.dtype), nxt.router.weight, getattr(nxt.router, "bias", None))
        idx = torch.topk(logits, nxt.top_k, dim=-1).indices.reshape(-1)
    if idx.numel() <= nxt.top_k:
        return sorted(idx.tolist()[:limit])
    return [e for e, _ in Counter(idx.tolist()).most_common(limit)]
