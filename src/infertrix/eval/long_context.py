"""KV-cache transforms at a long prompt: passkey retrieval, continuation perplexity, KV bytes and
decode speed, every cell's cache built from one recorded prefill.

A KV-cache transform does not change the prefill itself (each layer attends to the whole prompt and
is compressed after), so every micro-batch of prompts is prefilled once
(:func:`infertrix.kvcache.replay.record_prefill`) and each cell's cache is built from it by
:func:`infertrix.kvcache.replay.replay`, the very steps ``generate`` runs (checked identical to a
real prefill in tests/kvcache/test_replay.py). A cell with no cache transform gets a copy of the
recorded ``DynamicCache`` (what plain ``generate`` uses); one with ``growing_kv`` gets a
``GrowingCache`` holding the same tokens. Used by ``benchmarks/kvcache.py`` and the main job
(:mod:`infertrix.eval.workloads`).
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.api import optimize, restore
from ..core.generation import cache_argument_name
from ..core.transform import Transform
from .memory import kv_cache_bytes, peak_rss, trimmed_rss
from .passkey import passkey_trials
from .text import body_text

Log = Callable[[str], None]


@dataclass(frozen=True)
class KVCell:
    """One cell of a sweep: a label and the cache-stage transforms applied while it runs (none: the
    model's own cache). The other transforms of a recipe are applied to the model before the prefill
    is recorded (see :func:`infertrix.eval.workloads.run_kvcache`)."""

    label: str
    transforms: tuple[Transform, ...] = ()

    @property
    def policy(self):
        from ..kvcache import KVPolicy

        return next((t for t in self.transforms if isinstance(t, KVPolicy)), None)

    @property
    def quant(self):
        from ..kvcache import KIVI

        return next((t for t in self.transforms if isinstance(t, KIVI)), None)

    @property
    def growing(self):
        from ..kvcache import GrowingKV

        return next((t for t in self.transforms if isinstance(t, GrowingKV)), None)


class applied:
    """Apply a cell's transforms for the duration of a block (the attention hooks that give layers of
    different lengths their slice of the mask and compress later chunks), restored afterwards."""

    def __init__(self, model: nn.Module, cell: KVCell) -> None:
        self.model, self.cell = model, cell

    def __enter__(self):
        if self.cell.transforms:
            optimize(self.model, *self.cell.transforms)

    def __exit__(self, *exc):
        if self.cell.transforms:
            restore(self.model)


def cell_cache(model: nn.Module, rec, cell: KVCell):
    """The cache ``cell`` holds after the recorded prefill ``rec``."""
    from ..kvcache import GrowingCache
    from ..kvcache.replay import replay

    policy, quant, growing = cell.policy, cell.quant, cell.growing
    if policy is not None or quant is not None:
        return replay(model, rec, policy, quant)
    if growing is not None:  # growing_kv has no effect under a policy (PolicyCache is used then)
        cache = GrowingCache(model.config, growing.headroom, growing.min_headroom)
        for layer, src in zip(cache.layers, rec.cache.layers, strict=True):
            layer.update(src.keys, src.values)
        return cache
    return copy.deepcopy(rec.cache)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of token lists left-padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_from(model: nn.Module, cache, first: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Decode ``steps`` more tokens after ``first`` [B, 1] from a prompt cache (as generate does)."""
    toks = [first]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(toks[-1], attention_mask=mask, position_ids=pos, **{cache_argument_name(model): cache})
        toks.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(toks, 1)


def _quiet(msg: str) -> None:
    pass


@torch.no_grad()
def passkey_and_perplexity(
    model: nn.Module,
    tok,
    context: int,
    cells: list[KVCell],
    trials: int,
    micro_batch: int = 5,
    log: Log = _quiet,
    first_trial: int = 0,
    continuation: int = 128,
    samples: int = 2,
) -> dict[str, dict]:
    """Per cell label: ``correct``/``n`` passkey trials at ``context`` tokens (the prompts, keys and
    scoring of :func:`infertrix.eval.passkey_accuracy`, 6 greedy answer tokens), ``ppl``: perplexity
    of the next ``continuation`` tokens of real prose after a ``context``-token prompt held in the
    cell's cache (``samples`` samples), and ``kv_bytes``: bytes the cache holds per sequence after
    that prompt (:func:`infertrix.eval.kv_cache_bytes`). ``samples=0``: passkey only."""
    from ..kvcache.replay import record_prefill

    res: dict[str, dict] = {c.label: {"correct": 0, "n": 0} for c in cells}
    prompts = passkey_trials(tok, context, first_trial + trials)[first_trial:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, trials, micro_batch):
        chunk = prompts[start : start + micro_batch]
        ids, mask = left_pad([tok(p.prompt).input_ids for p in chunk], pad)
        t = time.time()
        rec = record_prefill(model, ids, mask, position_ids=positions(mask))
        first = rec.logits.argmax(-1, keepdim=True)
        log(f"  {context} tokens: prefill of trials {start}-{start + len(chunk) - 1} in {time.time() - t:.1f}s")
        t = time.time()
        for cell in cells:
            with applied(model, cell):
                gen = greedy_from(model, cell_cache(model, rec, cell), first, mask, 6)
            for row, trial in enumerate(chunk):
                res[cell.label]["correct"] += str(trial.key) in re.findall(r"\d+", tok.decode(gen[row]))
                res[cell.label]["n"] += 1
        log(f"  {context} tokens: {len(cells)} cells decoded in {time.time() - t:.1f}s")
        del rec
    if samples == 0:
        return res
    text_ids = tok(body_text()[: (context + continuation) * samples * 8], add_special_tokens=False).input_ids
    span = context + continuation
    if len(text_ids) < samples * span:
        raise ValueError(f"not enough text for {samples} samples of {span} tokens")
    ids = torch.tensor([text_ids[i * span : (i + 1) * span] for i in range(samples)])
    prompt, target = ids[:, :context], ids[:, context:]
    rec = record_prefill(model, prompt, torch.ones_like(prompt))
    for cell in cells:
        cache = cell_cache(model, rec, cell)
        kv_bytes = kv_cache_bytes(cache) / samples
        mask = torch.ones(samples, span, dtype=torch.long)
        with applied(model, cell):
            out = model(target, attention_mask=mask, **{cache_argument_name(model): cache})
        logits = torch.cat([rec.logits[:, None], out.logits[:, :-1]], 1).float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        res[cell.label].update(ppl=math.exp(nll.item()), kv_bytes=kv_bytes)
    return res


@torch.no_grad()
def decode_speed(
    model: nn.Module, tok, context: int, cells: list[KVCell], steps: int, rounds: int, log: Log = _quiet
) -> dict[str, dict]:
    """Decode tokens/s at ``context`` tokens, batch 1: ``rounds`` rounds, each running ``steps``
    steps of every cell in turn (interleaved, so slow phases of a shared machine hit every cell), on
    a fresh cache each round; the median step time of all rounds (first two steps of a round
    dropped). Also per cell: ``kv_bytes`` after decoding, ``scratch`` (a cache's reusable buffers,
    ``scratch_bytes()``), ``peak``: the peak RSS of building the cache and decoding, above the RSS
    before."""
    from ..kvcache.replay import record_prefill

    if steps < 3:
        raise ValueError(f"steps must be at least 3 (the first two of a round are not timed), got {steps}")
    ids = torch.tensor([tok(body_text()[: context * 8], add_special_tokens=False).input_ids[:context]])
    mask = torch.ones_like(ids)
    rec = record_prefill(model, ids, mask)
    first = rec.logits.argmax(-1, keepdim=True)
    out: dict[str, dict] = {c.label: {"times": [], "peak": 0} for c in cells}
    for rnd in range(rounds):
        for cell in cells:
            times = out[cell.label]["times"]

            def run(cell=cell, times=times):
                cache = cell_cache(model, rec, cell)
                m, tokn = mask, first
                for i in range(steps):
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    t = time.perf_counter()
                    o = model(tokn, attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1, **{cache_argument_name(model): cache})
                    tokn = o.logits[:, -1:].argmax(-1)
                    if i >= 2:
                        times.append(time.perf_counter() - t)
                return kv_cache_bytes(cache), getattr(cache, "scratch_bytes", lambda: 0)()

            base = trimmed_rss()
            with applied(model, cell):
                (kv_bytes, scratch), peak = peak_rss(run)
            d = out[cell.label]
            d.update(kv_bytes=kv_bytes, scratch=scratch, peak=max(d["peak"], peak - base))
            if rnd == rounds - 1:
                d["decode_tok_s"] = 1.0 / statistics.median(d["times"])
                log(f"  decode at {context}: {cell.label}: {d['decode_tok_s']:.1f} tok/s")
    return out
