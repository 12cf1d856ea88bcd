"""Prefill and decode speed through ``model.generate`` (so every transform's hooks apply)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .text import body_text


@contextmanager
def pinned_threads(threads: int | None):
    """Run with ``torch.set_num_threads(threads)`` (None: leave as is), restored afterwards."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_s: float  # median time of one prefill (the 1-token generate)
    decode_s: float  # median time of the new_tokens - 1 decode steps
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    repeats: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tok, prompt_tokens: int, batch_size: int = 1) -> torch.Tensor:
    """``[batch, prompt_tokens]`` ids of real prose; rows start at different places in the novel."""
    text = body_text()
    rows = []
    for b in range(batch_size):
        start = b * len(text) // (batch_size + 1)
        ids = tok(text[start : start + prompt_tokens * 8], add_special_tokens=False).input_ids
        if len(ids) < prompt_tokens:
            raise ValueError(f"not enough text for {prompt_tokens} prompt tokens")
        rows.append(ids[:prompt_tokens])
    return torch.tensor(rows)


@torch.no_grad()
def measure_speed(
    model,
    tok,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    repeats: int = 3,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 1,
) -> SpeedResult:
    """Median prefill and decode throughput of greedy ``model.generate``.

    Prefill time is that of generating one token; decode time is the extra time of generating
    ``new_tokens`` (EOS suppressed so every run makes exactly that many), over ``new_tokens - 1``
    steps. Threads are pinned to ``threads`` for the measurement; one warm-up run goes first.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    device = next(model.parameters()).device
    ids = prompt_ids(tok, prompt_tokens, batch_size).to(device)
    mask = torch.ones_like(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(n: int) -> float:
        t = time.perf_counter()
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
        )
        return time.perf_counter() - t

    with pinned_threads(threads):
        for _ in range(warmup):
            run(new_tokens)
        pre, full = [], []
        for _ in range(repeats):
            pre.append(run(1))
            full.append(run(new_tokens))
        prefill = statistics.median(pre)
        decode = max(statistics.median(full) - prefill, 1e-9)
        nthreads = torch.get_num_threads()
    return SpeedResult(
        prefill_tokens_per_s=batch_size * prompt_tokens / prefill,
        decode_tokens_per_s=batch_size * (new_tokens - 1) / decode,
        prefill_s=prefill,
        decode_s=decode,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch_size=batch_size,
        repeats=repeats,
        threads=nthreads,
    )
