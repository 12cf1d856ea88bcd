"""Memory figures: peak resident memory of a piece of work, and KV-cache bytes."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading
from collections.abc import Callable
from typing import Any

import torch


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trimmed_rss() -> int:
    """Resident bytes now, after a garbage collection and handing freed heap back to the OS
    (glibc ``malloc_trim``), so that a later peak is comparable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return current_rss()


def peak_rss(fn: Callable[[], Any], interval_s: float = 0.001) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak resident bytes of this process while it ran)``.

    Two readings, the larger wins: on Linux the kernel's high-water mark, reset first
    (``/proc/self/clear_refs``) so that it belongs to this piece of work, and a thread that
    samples the resident size every ``interval_s`` while ``fn`` runs (some sandboxes neither
    reset nor track the high-water mark). Where the reset is refused the kernel's figure is the
    process's lifetime peak and only the sampled one is used. Memory that the allocator already
    held resident (freed but not returned) is not new: start from :func:`trimmed_rss` to see it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    peak = current_rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(interval_s):
            peak = max(peak, current_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, current_rss())
    hwm = _read_hwm() if reset else None
    return result, max(peak, hwm or 0)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the tensors of a transformers ``Cache`` (every layer, keys, values and any
    other tensors a policy keeps), counting shared storage once."""
    if cache is None:
        return 0
    from ..kvcache.kivi_store import KIVIStore

    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0:
                return
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, list | tuple):
            for o in obj:
                visit(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                visit(o)
        elif isinstance(obj, KIVIStore):  # a layer's 2/4-bit codes, scales and zeros
            visit(vars(obj))

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} is not a transformers 5 Cache (no .layers)")
    for layer in layers:
        visit(vars(layer))
    return total
