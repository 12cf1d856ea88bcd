"""Log-likelihood of a continuation, scored as the optimized model would see it.

Weight and layer transforms (quant, skip, moe) change every forward, so any harness measures them.
KV-cache transforms act only on a cache: a plain ``model(input_ids)`` forward (lm-eval's
``loglikelihood``) scores them as the unoptimized model. :func:`loglikelihood` scores through the
compressed cache instead (kvpress's question-agnostic protocol, see
:func:`infertrix.kvcache.scoring.continuation_logprobs`); :func:`compressed_scoring` does it for
harnesses that call the model themselves. See docs/evaluation.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kvcache.scoring import compressed_scoring, continuation_logprobs

__all__ = ["compressed_scoring", "loglikelihood", "loglikelihood_tokens"]


def loglikelihood_tokens(model: nn.Module, context_ids, continuation_ids) -> float:
    """Sum of the continuation tokens' log-probabilities after the context (sequences of token ids),
    through the model's KV-cache transforms when it has any: the context is compressed as
    ``generate`` would compress it, and every continuation token is predicted from that cache."""
    ctx = torch.as_tensor(context_ids, dtype=torch.long).flatten()
    cont = torch.as_tensor(continuation_ids, dtype=torch.long).flatten()
    return float(continuation_logprobs(model, ctx, cont).sum())


def loglikelihood(model: nn.Module, tok, context: str, continuation: str) -> float:
    """``log P(continuation | context)`` as :func:`loglikelihood_tokens`, from text.

    Tokenized as lm-eval does: trailing spaces of the context move to the continuation, the pair
    is tokenized whole and the continuation is what follows the context's own tokens (so a token
    spanning the boundary is not split). No special tokens are added.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tok(stripped + continuation, add_special_tokens=False).input_ids
    n = len(tok(stripped, add_special_tokens=False).input_ids)
    return loglikelihood_tokens(model, whole[:n], whole[n:])
