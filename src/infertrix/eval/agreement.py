"""Agreement of an optimized model's greedy output with the unoptimized model's."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

# what the main job (infertrix bench) checks greedy agreement on
AGREEMENT_PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The quickest way to learn a new language is",
    "Question: What is the capital of France?\nAnswer:",
]


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


class _ForceAndRecord:
    """A logits processor that records the model's greedy choice at each step, then forces the
    reference token, so every step is scored on the reference prefix (teacher forcing)."""

    def __init__(self, reference: list[int], prompt_len: int):
        self.reference, self.prompt_len, self.choices = reference, prompt_len, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        self.choices.append(int(scores[0].argmax()))
        forced = torch.full_like(scores, float("-inf"))
        forced[0, self.reference[step]] = 0.0
        return forced


@torch.no_grad()
def next_token_agreement(model, tok, prompts: list[str], reference: list[list[int]], progress: bool = False) -> float:
    """Fraction of the reference's positions where ``model``'s greedy next token equals the
    reference token, the model being fed the reference prefix (teacher forcing) through its own
    ``generate``, so every transform that acts in decoding (cache policies, skip schedules) is in the
    path. Unlike :func:`token_agreement`, one early difference does not make every later position
    count as wrong: it measures how often the optimized model picks the same next token."""
    from transformers import LogitsProcessorList

    if len(prompts) != len(reference):
        raise ValueError(f"{len(prompts)} prompts for {len(reference)} references")
    device = next(model.parameters()).device
    same = total = 0
    for p, ref in tqdm(list(zip(prompts, reference, strict=True)), desc="next-token", disable=not progress, leave=False):
        if not ref:
            continue
        enc = tok(p, return_tensors="pt").to(device)
        rec = _ForceAndRecord(ref, enc.input_ids.shape[1])
        model.generate(**enc, max_new_tokens=len(ref), min_new_tokens=len(ref), do_sample=False,
                       pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([rec]))
        same += sum(a == b for a, b in zip(rec.choices, ref, strict=False))
        total += len(ref)
    return same / total if total else 1.0


def greedy_agreement(model, tok, prompts: list[str], reference_tokens: list[list[int]], max_new_tokens: int = 128) -> float:
    """Position-wise agreement of ``model``'s greedy output with ``reference_tokens``
    (from :func:`greedy_tokens` on the unoptimized model)."""
    return token_agreement(greedy_tokens(model, tok, prompts, max_new_tokens), reference_tokens)
