"""Decoding loops against plain ``generate``: speed on copy-heavy and open prompts, token identity.

Prompt kinds, four prompts each, all through the model's chat template: ``rewrite`` (correct the
spelling of a passage of *Pride and Prejudice*, shipped with infertrix, into which a few letter
swaps were introduced: the model copies most of the passage, the workload of prompt lookup),
``story`` (continue a story opening) and ``question`` (answer a question): open-ended output.

:func:`compare_decoding` runs plain ``generate`` and each variant (transforms applied, measured,
then restored) interleaved round by round (plain, variant, variant..., plain, ...) so that load
drift hits all alike; figures are medians of the repeats. Decode tokens/s = (generated tokens -
first tokens) / (generate time - prefill time), where generated tokens count each row up to its
eos and the prefill time is the median time of ``generate(max_new_tokens=1)``. Greedy rows record
whether the output is token-identical to plain ``generate``. Mean accepted length = tokens emitted
per row per verification forward (1.0 = no gain). Used by ``benchmarks/speculative.py`` and the
main job (:mod:`infertrix.eval.workloads`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..core.api import optimize, restore
from ..core.transform import Transform
from ..speculative.state import speculative_state
from .text import body_text

REWRITE_STARTS = [
    "It is a truth universally acknowledged",
    "Mr. Bennet was among the earliest of those who waited on Mr. Bingley",
    "Within a short walk of Longbourn lived a family",
    "Elizabeth, feeling really anxious, was determined to go to her",
]
STORIES = [
    "The lighthouse keeper had not seen a ship in eleven days when the storm finally broke.",
    "On the morning of her seventieth birthday, Margaret found a key she did not recognise.",
    "The train stopped in the middle of the forest, and the conductor walked off without a word.",
    "Every night at nine, the dog next door began to bark at exactly the same tree.",
]
QUESTIONS = [
    "What causes the seasons on Earth? Explain clearly.",
    "How does a refrigerator keep food cold?",
    "What are the main differences between a virus and a bacterium?",
    "Why do leaves change colour in autumn?",
]
KINDS = ("rewrite", "story", "question")


def passage(start: str, chars: int = 900) -> str:
    """A passage of the shipped prose from ``start``, whole sentences, line breaks joined."""
    text = body_text()
    i = text.find(start)
    if i < 0:
        raise ValueError(f"passage start {start!r} not found in the shipped text")
    chunk = text[i : i + chars]
    return " ".join(chunk[: chunk.rfind(".") + 1].split())


def misspell(text: str, every: int = 9) -> str:
    """Swap two inner letters of every ``every``-th long word (deterministic typos to correct)."""
    words = text.split(" ")
    for j in range(3, len(words), every):
        w = words[j]
        if len(w) > 4 and w.isalpha():
            words[j] = w[:2] + w[3] + w[2] + w[4:]
    return " ".join(words)


def decoding_prompts(kind: str) -> list[str]:
    """The four user messages of a prompt kind (``rewrite``, ``story`` or ``question``)."""
    if kind == "rewrite":
        return [
            "Correct the spelling mistakes in the following passage. Reply with the corrected passage only."
            f"\n\n{misspell(passage(s))}"
            for s in REWRITE_STARTS
        ]
    if kind == "story":
        return [f"Continue this story:\n\n{s}" for s in STORIES]
    if kind == "question":
        return list(QUESTIONS)
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {KINDS}")


def encode_chat(tok, kind: str, batch: int):
    """The first ``batch`` prompts of ``kind`` through the chat template (left-padded when the
    tokenizer pads left), as a tokenizer batch; a tokenizer without a chat template gets the
    messages as they are."""
    if batch > len(decoding_prompts(kind)):
        raise ValueError(f"batch {batch} is larger than the {len(decoding_prompts(kind))} prompts of {kind!r}")
    msgs = decoding_prompts(kind)[:batch]
    if getattr(tok, "chat_template", None):
        msgs = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in msgs
        ]
    return tok(msgs, return_tensors="pt", padding=True)


def real_tokens(out: torch.Tensor, prompt_len: int, eos: set[int]) -> int:
    """Generated tokens of every row of ``out`` up to and including its first eos."""
    n = 0
    for row in out[:, prompt_len:].tolist():
        for t in row:
            n += 1
            if t in eos:
                break
    return n


def eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return set() if eos is None else {int(t) for t in torch.as_tensor(eos).flatten().tolist()}


def _quiet(row: dict) -> None:
    pass


@torch.no_grad()
def _prefill_seconds(model: nn.Module, enc, repeats: int) -> float:
    """Median time of a one-token ``generate`` (the prefill), after one warm-up; decode speeds
    subtract it."""
    prefill = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, do_sample=False)
        prefill.append(time.perf_counter() - t0)
    return statistics.median(prefill[1:])


def compare_decoding(
    model: nn.Module,
    tok,
    variants: dict[str, tuple[Transform | str, ...]],
    kind: str,
    batch: int = 1,
    mode: str = "greedy",
    new_tokens: int = 128,
    repeats: int = 3,
    warmup_tokens: int = 40,
    log: Callable[[dict], None] = _quiet,
    base: tuple[Transform | str, ...] = (),
) -> list[dict]:
    """One row for plain ``generate`` and one per variant (name -> transforms, applied around each
    of its runs and restored after): decode tok/s, speed-up over plain, mean accepted length,
    tokens, and (greedy) whether the output is token-identical to plain's. "Plain" is ``generate``
    after ``optimize(model)`` with no transform, i.e. with what ``optimize`` adds by default (the
    decode engine, where it supports the model), as every variant has it: a variant's speed-up is
    its own, not the engine's (a variant with ``engine(enabled=false)`` runs the module path).
    ``base`` (e.g. ``("w4a8",)``) is applied under plain and under every variant, so that a drafter
    is compared with plain decoding of the same quantized (or compressed) target; it is applied
    anew before each run, outside the timed region.
    Reuse transform objects across calls to keep their state (a self-speculation plan search, a
    quantized draft copy).

    Round 0 is a warm-up of ``warmup_tokens`` tokens (long enough for a self-speculative plan
    search to finish), then ``repeats`` timed rounds; ``mode`` is ``"greedy"`` or ``"sample"``
    (temperature 0.7, one seed per round shared by every variant)."""
    if mode not in ("greedy", "sample"):
        raise ValueError(f"mode must be 'greedy' or 'sample', got {mode!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    eos = eos_ids(model)
    enc = encode_chat(tok, kind, batch)
    plen = enc.input_ids.shape[1]
    optimize(model, *base)  # what plain runs with (the prefill is timed on it)
    try:
        t_prefill = _prefill_seconds(model, enc, repeats)
    finally:
        restore(model)
    sample = mode == "sample"
    kw = dict(max_new_tokens=new_tokens, do_sample=sample)
    if sample:
        kw.update(temperature=0.7, top_k=0, top_p=1.0)
    if "plain" in variants:
        raise ValueError("'plain' names plain generate; give the variant another name")
    runs: dict[str, tuple] = {"plain": (), **variants}
    res: dict[str, dict] = {v: {"t": [], "tok": [], "mal": [], "out": None} for v in runs}
    for r in range(repeats + 1):
        for name, t in runs.items():
            optimize(model, *base, *t)  # plain: () gets only the base and the defaults
            torch.manual_seed(1000 + r)
            t0 = time.perf_counter()
            out = model.generate(**enc, **(kw if r else {**kw, "max_new_tokens": warmup_tokens}))
            dt = time.perf_counter() - t0
            spec = speculative_state(model)
            if t and r and spec is not None and spec.stats is not None:
                res[name]["mal"].append(spec.stats.last.mean_accepted_length)
            restore(model)
            if r == 0:
                continue
            if r == 1:
                res[name]["out"] = out
            res[name]["t"].append(dt)
            res[name]["tok"].append(real_tokens(out, plen, eos))
    rows = _rows(res, t_prefill, kind, batch, sample)
    for row in rows:
        log(row)
    return rows


def _rows(res: dict[str, dict], t_prefill: float, kind: str, batch: int, sample: bool) -> list[dict]:
    """compare_decoding's table rows from each run's times, token counts and outputs."""
    tps_of = {
        name: statistics.median((n - batch) / max(t - t_prefill, 1e-9) for n, t in zip(d["tok"], d["t"], strict=True))
        for name, d in res.items()
    }
    return [
        {
            "prompts": kind,
            "batch": batch,
            "mode": "greedy" if not sample else "T=0.7",
            "method": name,
            "decode tok/s": round(tps_of[name], 2),
            "speed-up": round(tps_of[name] / tps_of["plain"], 3),
            "mean accepted length": round(statistics.median(d["mal"]), 2) if d["mal"] else "",
            "tokens": statistics.median(d["tok"]),
            "identical to plain": ("yes" if torch.equal(d["out"], res["plain"]["out"]) else "NO")
            if not sample and name != "plain"
            else "",
            "run": time.strftime("%Y-%m-%d", time.gmtime()),  # a row's speed-up is against its own run's plain
        }
        for name, d in res.items()
    ]
