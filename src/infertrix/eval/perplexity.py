"""Perplexity on real prose, in non-overlapping windows."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..core import calibration
from ..core.generation import cache_argument_name, output_cache
from .text import body_text


def token_windows(tok, text: str | None, max_tokens: int, window: int) -> torch.Tensor:
    """``[n_windows, window]`` token ids from the start of ``text`` (default: the shipped novel's
    body), cut by the calibration reader (:func:`infertrix.core.calibration.token_windows`)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens < window:
        raise ValueError(f"max_tokens={max_tokens} is fewer than one window of {window}")
    return calibration.token_windows(tok, body_text() if text is None else text, windows=max_tokens // window,
                                     window_tokens=window)


@torch.no_grad()
def perplexity(
    model,
    tok,
    text: str | None = None,
    max_tokens: int = 4096,
    window: int = 512,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping ``window``-token chunks
    of ``text`` (default: *Pride and Prejudice*), using at most ``max_tokens`` tokens.

    Each window is scored independently from its own start (no carried context), the standard
    fixed-window protocol; the first token of each window is context only.
    """
    windows = token_windows(tok, text, max_tokens, window)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:]
        nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def continuation_perplexity(
    model,
    tok,
    max_tokens: int = 2048,
    window: int = 512,
    context: int = 128,
    batch_size: int = 4,
    text: str | None = None,
) -> float:
    """Perplexity of tokens ``context+1 .. window-1`` of each window of ``text`` (default: *Pride and
    Prejudice*), the first ``context`` prefilled into the cache and the rest fed as one continuation
    pass over it and scored: transforms that act on cached decoding (AdaSkip measures on the prefill,
    SkipDecode skips by position, cache policies) are scored as they run in generation, which the
    full-window :func:`perplexity` (no cache) does not see."""
    if not 0 < context < window - 1:
        raise ValueError(f"context must be in [1, window - 2] = [1, {window - 2}], got {context}")
    wins = token_windows(tok, text, max_tokens, window)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        x = wins[i : i + batch_size].to(device)
        pre = model(input_ids=x[:, :context], use_cache=True)
        cont = model(input_ids=x[:, context:-1], **{cache_argument_name(model): output_cache(pre)}, use_cache=True)
        logits = torch.cat([pre.logits[:, -1:], cont.logits], dim=1).float()
        target = x[:, context:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1))
        nll -= logp.sum().item()
        count += target.numel()
    return math.exp(nll / count)
