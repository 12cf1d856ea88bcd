"""Passkey retrieval: a number hidden at a chosen depth of real prose, asked for at the end.

The long-context test of Mohtashami & Jaggi, "Landmark Attention" (2023), with the distractor
text taken from a real novel rather than a repeated sentence, so that eviction policies see
natural attention patterns.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .text import body_text

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def passkey_prompt(tok, context_tokens: int, depth: float, key: int, offset: int = 0) -> str:
    """A prompt of about ``context_tokens`` tokens: prose, the needle at ``depth`` (0 = start,
    1 = end) of the prose, then the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)
    fixed = len(tok(needle + QUESTION, add_special_tokens=False).input_ids) + 2
    budget = context_tokens - fixed
    if budget < 16:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for prose around the needle")
    text = body_text()
    text = text[offset % max(1, len(text) - budget * 8) :]
    ids = tok(text[: budget * 8], add_special_tokens=False).input_ids[:budget]
    cut = int(round(depth * len(ids)))
    before = tok.decode(ids[:cut])
    after = tok.decode(ids[cut:])
    return f"{before} {needle} {after}{QUESTION}"


@dataclass(frozen=True)
class PasskeyTrial:
    depth: float
    key: int
    prompt: str


def passkey_trials(
    tok, context_tokens: int, trials: int, depths: tuple[float, ...] = DEPTHS, seed: int = 0
) -> list[PasskeyTrial]:
    """The trials of :func:`passkey_accuracy`: spread evenly over ``depths``, each with a fresh
    5-digit key and another stretch of the novel (the same for the same ``seed``)."""
    rng = random.Random(seed)
    out = []
    for i in range(trials):
        depth = depths[i % len(depths)]
        key = rng.randint(10000, 99999)
        out.append(PasskeyTrial(depth, key, passkey_prompt(tok, context_tokens, depth, key, offset=rng.randint(0, 10**6))))
    return out


@torch.no_grad()
def passkey_accuracy(
    model,
    tok,
    context_tokens: int = 2048,
    depths: tuple[float, ...] = DEPTHS,
    trials: int = 20,
    seed: int = 0,
    progress: bool = False,
    return_details: bool = False,
):
    """Fraction of ``trials`` prompts (:func:`passkey_trials`) whose greedy answer contains the
    passkey."""
    device = next(model.parameters()).device
    details = []
    for trial in tqdm(
        passkey_trials(tok, context_tokens, trials, depths, seed),
        desc=f"passkey@{context_tokens}",
        disable=not progress,
        leave=False,
    ):
        enc = tok(trial.prompt, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, enc.input_ids.shape[1] :])
        found = re.findall(r"\d+", answer)
        details.append({"depth": trial.depth, "key": trial.key, "answer": answer, "correct": str(trial.key) in found})
    acc = sum(d["correct"] for d in details) / len(details)
    return (acc, details) if return_details else acc
