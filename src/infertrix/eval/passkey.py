"""Passkey retrieval: a number hidden at a chosen depth of real prose, asked for at the end.

The long-context test of Mohtashami & Jaggi, "Landmark Attention" (2023), with the distractor
text taken from a real novel rather than a repeated sentence, so that eviction policies see
natural attention patterns.
"""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from .text import body_text

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


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


@torch.no_grad()
def passkey_accuracy(
    model,
    tok,
    context_tokens: int = 2048,
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    trials: int = 20,
    seed: int = 0,
    progress: bool = False,
    return_details: bool = False,
):
    """Fraction of ``trials`` prompts (spread evenly over ``depths``) whose greedy answer contains
    the passkey. Each trial uses a fresh 5-digit key and another stretch of the novel."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    details = []
    for i in tqdm(range(trials), desc=f"passkey@{context_tokens}", disable=not progress, leave=False):
        depth = depths[i % len(depths)]
        key = rng.randint(10000, 99999)
        prompt = passkey_prompt(tok, context_tokens, depth, key, offset=rng.randint(0, 10**6))
        enc = tok(prompt, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, enc.input_ids.shape[1] :])
        found = re.findall(r"\d+", answer)
        details.append({"depth": depth, "key": key, "answer": answer, "correct": str(key) in found})
    acc = sum(d["correct"] for d in details) / len(details)
    return (acc, details) if return_details else acc
