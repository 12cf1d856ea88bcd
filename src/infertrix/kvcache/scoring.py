"""Scoring text under a KV-cache transform: what ``generate`` would see, for log-likelihood harnesses.

A cache policy (or KIVI) acts only on a cache, so a plain forward (``model(input_ids)``, no cache:
what lm-eval's ``loglikelihood``, perplexity scripts and most harnesses run) scores with the full
cache, exactly as the unoptimized model. Two ways to score with the cache the policy leaves:

- :func:`continuation_logprobs` (behind ``infertrix.eval.loglikelihood``): the question-agnostic
  protocol of kvpress (NVIDIA, https://github.com/NVIDIA/kvpress): the context but its last token is
  prefilled into a fresh policy cache, which compresses it as in ``generate``; the last context
  token and the continuation are then fed against the compressed cache, so every continuation
  token, the first included, is predicted from the compressed context.
- :func:`compressed_scoring`, a context manager for harnesses that call ``model(input_ids)`` and
  read ``.logits`` (they do not say where the context ends): inside it, a plain forward of several
  tokens runs as a chunked prefill through a fresh policy cache, chunks of ``chunk_tokens`` from
  each row's first token; each chunk attends to the cache as the policy left it after the previous
  chunks, plus itself. A position's logits depend only on the tokens before it and the chunk size,
  never on the rest of its batch (left-padded rows run alone).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..core import ConfigError, UnsupportedModelError
from ..core.generation import cache_argument, cache_argument_name
from ..core.model import text_config
from .attach import KVCacheSetup, kv_setup
from .cache import full_attention_layers

# forward arguments that come along with the sequence and are cut into chunks with it
_SEQUENCE_ARGS = ("input_ids", "inputs_embeds", "position_ids")


def _setup_of(model: nn.Module) -> KVCacheSetup:
    setup = kv_setup(model)
    if setup is None:
        raise UnsupportedModelError(
            "no infertrix.kvcache transform is applied to this model, so its plain forward already is what "
            "generate sees; apply one first, e.g. infertrix.optimize(model, 'snapkv:0.5')"
        )
    return setup


def min_chunk_tokens(setup: KVCacheSetup, num_layers: int) -> int:
    """The shortest chunk after which the applied policy can compress: at least its
    ``prefill_min_tokens`` (shorter forwards count as decoding), with the requested budget holding
    the policy's minimum and every layer's budget the tokens it always keeps. KIVI alone: one quantization group."""
    policy = setup.policy
    if policy is None or policy.is_noop:
        return setup.quant.group_size if setup.quant is not None else policy.prefill_min_tokens
    forced, fixed = policy.min_budget(), policy.fixed_part()[0]
    for c in range(policy.prefill_min_tokens, 1 << 20):
        # the requested budget itself holds what the method always keeps (no "kept more" step)
        if policy.requested(c) >= forced and all(
            policy.layer_target(c, r, num_layers) >= fixed for r in range(num_layers)
        ):
            return c
    raise ConfigError(f"{type(policy).__name__}'s budget never holds its {forced} always-kept tokens")


def _forward_with_cache(model: nn.Module, ids: Tensor, cache, seen: int, **kwargs: Any):
    """One forward of ``ids`` [B, n] after ``seen`` cached tokens, with the 2D mask ``generate`` passes."""
    mask = torch.ones(ids.shape[0], seen + ids.shape[1], dtype=torch.long, device=ids.device)
    return model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_argument_name(model): cache}, **kwargs)


@torch.no_grad()
def continuation_logprobs(model: nn.Module, context_ids: Tensor, continuation_ids: Tensor) -> Tensor:
    """Log-probabilities [k] of the ``k`` continuation tokens after the context (1D id tensors),
    scored against the context's cache as the model's KV-cache transforms leave it.

    The context but its last token is the prefill (compressed as ``generate`` would compress that
    prompt); the last context token and the continuation follow against the compressed cache, in
    one forward, or one token at a time when the cache also changes while decoding
    (``decode_interval`` > 0, KIVI quantizing tokens as they age), as teacher-forced decoding would.
    Without a KV-cache transform this is a plain forward over context and continuation.
    """
    if context_ids.dim() != 1 or continuation_ids.dim() != 1:
        raise ValueError("context_ids and continuation_ids are 1D token id tensors (one request)")
    if len(context_ids) == 0 or len(continuation_ids) == 0:
        raise ValueError(
            "the context and the continuation need at least one token each; start an empty context with "
            "the tokenizer's BOS or EOS token, as lm-eval does"
        )
    device = next(model.parameters()).device
    ids = torch.cat([context_ids, continuation_ids]).to(device)[None]
    m, k = len(context_ids), len(continuation_ids)
    setup = kv_setup(model)
    if setup is None:
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits[:, m - 1 :]
    else:
        cache = setup.new_cache()
        if m > 1:  # the prefill: compressed by the policy after each layer's attention
            _forward_with_cache(model, ids[:, : m - 1], cache, 0, logits_to_keep=1)
        rest = ids[:, m - 1 : -1]  # the last context token, then the continuation but its last token
        policy = setup.policy
        stepwise = setup.quant is not None or (policy is not None and policy.decode_interval > 0)
        if stepwise:
            parts = [
                _forward_with_cache(model, rest[:, i : i + 1], cache, m - 1 + i).logits for i in range(k)
            ]
            logits = torch.cat(parts, dim=1)
        else:
            logits = _forward_with_cache(model, rest, cache, m - 1).logits
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return logp.gather(-1, ids[0, m:, None]).squeeze(-1)


class _ChunkedForward:
    """The ``forward`` a model has inside :func:`compressed_scoring`."""

    def __init__(self, model: nn.Module, setup: KVCacheSetup, chunk: int, inner) -> None:
        self.model, self.setup, self.chunk, self.inner = model, setup, chunk, inner
        self.signature = inspect.signature(inner)

    def __call__(self, *args: Any, **kwargs: Any):
        bound = self.signature.bind_partial(*args, **kwargs)
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}))
        seq = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        if cache_argument(a) is not None or seq is None or seq.shape[1] <= 1:
            return self.inner(*args, **kwargs)  # generate's steps, decoding: the policy acts already
        for flag in ("output_attentions", "output_hidden_states"):
            if a.get(flag):
                raise ConfigError(
                    f"compressed_scoring returns logits (and the loss) only; call without {flag}=True, or "
                    "outside compressed_scoring"
                )
        labels = a.pop("labels", None)
        keep = a.pop("logits_to_keep", 0)
        return_dict = a.pop("return_dict", None)
        mask = a.pop("attention_mask", None)
        a.pop("use_cache", None)
        seqs = {n: a.pop(n) for n in _SEQUENCE_ARGS if a.get(n) is not None}
        if mask is None or bool(mask.all()):
            logits, cache = self._run(seqs, a)
        else:  # padded rows run alone, their pads stripped: a row never depends on its batch
            logits, cache = self._run_rows(seqs, mask, a)
        loss = None
        if labels is not None:
            loss = self.model.loss_function(
                logits=logits, labels=labels, vocab_size=text_config(self.model).vocab_size
            )
        if isinstance(keep, int) and keep > 0:
            logits = logits[:, -keep:]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
        return out.to_tuple() if return_dict is False else out

    def _run(self, seqs: dict[str, Tensor], extra: dict[str, Any]):
        n = next(iter(seqs.values())).shape[1]
        cache, parts = self.setup.new_cache(), []
        for s in range(0, n, self.chunk):
            piece = {name: t[:, s : s + self.chunk] for name, t in seqs.items()}
            first = next(iter(piece.values()))
            mask = torch.ones(first.shape[0], s + first.shape[1], dtype=torch.long, device=first.device)
            out = self.model(
                **piece, attention_mask=mask, use_cache=True, **{cache_argument_name(self.model): cache}, **extra
            )
            parts.append(out.logits)
        return torch.cat(parts, dim=1), cache

    def _run_rows(self, seqs: dict[str, Tensor], mask: Tensor, extra: dict[str, Any]):
        rows = []
        for r in range(mask.shape[0]):
            where = mask[r].nonzero().flatten()
            if len(where) and int(where[-1] - where[0]) + 1 != len(where):
                raise ConfigError(
                    "compressed_scoring needs each row's tokens contiguous (left or right padding); the "
                    f"attention mask of row {r} has a gap"
                )
            rows.append(where)
        first = next(iter(seqs.values()))
        logits = None
        for r, where in enumerate(rows):
            if len(where) == 0:
                continue
            lo, hi = int(where[0]), int(where[-1]) + 1
            row_logits, _ = self._run({n: t[r : r + 1, lo:hi] for n, t in seqs.items()}, extra)
            if logits is None:  # pad positions keep zeros: nothing is predicted from a pad
                logits = row_logits.new_zeros(first.shape[0], first.shape[1], row_logits.shape[-1])
            logits[r, lo:hi] = row_logits[0]
        if logits is None:
            raise ValueError("compressed_scoring: the attention mask hides every token")
        return logits, None


@contextlib.contextmanager
def compressed_scoring(model: nn.Module, chunk_tokens: int | None = None) -> Iterator[nn.Module]:
    """Inside this block, a plain forward of ``model`` (several tokens, no cache passed: what
    harnesses such as lm-eval's ``HFLM.loglikelihood`` run) is scored through the model's KV-cache
    transforms: a chunked prefill through a fresh policy cache, ``chunk_tokens`` at a time from
    each row's first token, each chunk attending to the cache as the policy left it.

    ``chunk_tokens`` defaults to the shortest chunk the policy can compress after (SnapKV at 0.5
    with its 32-token window: 64); a shorter one is refused. Forwards that pass a cache
    (``generate``'s steps) are untouched. Costs one forward per chunk.
    Yields the model.
    """
    setup = _setup_of(model)
    need = min_chunk_tokens(setup, len(full_attention_layers(model.config)))
    if chunk_tokens is None:
        chunk_tokens = need
    elif not isinstance(chunk_tokens, int) or chunk_tokens < need:
        what = type(setup.policy or setup.quant).__name__
        raise ConfigError(
            f"compressed_scoring: {what} compresses only after chunks of at least {need} tokens, got "
            f"chunk_tokens={chunk_tokens!r}; pass chunk_tokens >= {need} or leave it to the default"
        )
    if setup.scoring is not None:
        raise ConfigError("compressed_scoring is already active on this model; do not nest it")
    inner = model.__dict__.get("forward", type(model).forward.__get__(model))
    had_own = "forward" in model.__dict__
    model.__dict__["forward"] = _ChunkedForward(model, setup, chunk_tokens, inner)
    setup.scoring = chunk_tokens
    try:
        yield model
    finally:
        setup.scoring = None
        if had_own:
            model.__dict__["forward"] = inner
        else:
            model.__dict__.pop("forward", None)
