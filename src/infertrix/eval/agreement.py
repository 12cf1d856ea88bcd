"""Agreement of an optimized model's greedy output with the unoptimized model's."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def greedy_tokens(model, tok, prompts: list[str], max_new_tokens: int = 128, progress: bool = False) -> list[list[int]]:
    """The greedy continuation (new tokens only) of each prompt, one prompt at a time."""
    out = []
    device = next(model.parameters()).device
    for p in tqdm(prompts, desc="greedy", disable=not progress, leave=False):
        enc = tok(p, return_tensors="pt").to(device)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        out.append(gen[0, enc.input_ids.shape[1] :].tolist())
    return out


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of reference positions where ``tokens`` holds the same token (missing = wrong)."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} outputs for {len(reference)} references")
    same = total = 0
    for t, r in zip(tokens, reference, strict=True):
        total += len(r)
        same += sum(a == b for a, b in zip(t, r, strict=False))
    return same / total if total else 1.0


def greedy_agreement(model, tok, prompts: list[str], reference_tokens: list[list[int]], max_new_tokens: int = 128) -> float:
    """Position-wise agreement of ``model``'s greedy output with ``reference_tokens``
    (from :func:`greedy_tokens` on the unoptimized model)."""
    return token_agreement(greedy_tokens(model, tok, prompts, max_new_tokens), reference_tokens)
