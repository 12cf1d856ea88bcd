"""The next turn of a chat on a compressed cache: what ``generate`` is refused before it starts.

transformers continues a conversation on the cache of the previous ``generate`` call (its
"cache reuse" pattern): the caller passes the whole conversation so far, ``input_ids`` =
``torch.cat([out.sequences, new_ids], 1)``, and ``generate`` feeds only the tokens the cache has not
seen, ``input_ids[:, cache.get_seq_length():]``, at positions continuing from there (from the
attention mask's running count). A :class:`~.policy_cache.PolicyCache` reports every token it has
seen, evicted ones included, so the cut and the rotary positions are the uncompressed cache's; the
new tokens are a prefill chunk and the policy compresses the grown cache back to its budget of all
tokens seen (``compression`` of them, or ``budget`` tokens).

What cannot work is refused here with the fix, before the cache changes, never left to run wrong:

- ``input_ids`` that do not start with the tokens the cache has seen (a different conversation, the
  previous answer left out, or a chat template that re-tokenizes it differently) would be cut at the
  wrong place; a compressed cache cannot be rolled back to the common prefix and prefilled again (the
  evicted tokens are gone). transformers does not check this; the cache records the token ids every
  forward fed (``PolicyCache.note_tokens``) and the call is compared with them.
- pads after a row's first token (right padding, or left-padded new messages of different lengths
  in a batch): eviction keeps a row's pads as its first stored slots (kvcache/cache.py), which holds
  only for pads before all of the row's tokens.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core import ConfigError
from .policy_cache import PolicyCache


def generate_input_ids(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The token ids a ``generate`` call was given (None for ``inputs_embeds``)."""
    ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    return ids if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point() else None


def check_left_padding(cache: PolicyCache, mask: Any) -> None:
    """Refuse a 2D attention mask with pads after a row's first token while ``cache`` evicts."""
    if cache.policy is None or cache.policy.is_noop or not isinstance(mask, Tensor) or mask.dim() != 2:
        return
    rows = (mask[:, 1:] < mask[:, :-1]).any(-1).nonzero().flatten().tolist()
    if rows:
        raise ConfigError(
            f"{type(cache.policy).__name__} needs left padding (pads before each row's tokens), but the "
            f"attention mask of row {rows[0]} hides tokens after visible ones. Set tokenizer.padding_side = "
            "'left'; in the next turn of a batched chat, give every row's new message the same length (or run "
            "the rows one at a time): only the first turn may be padded, and tokens generate fed after a row "
            "ended (pads after its end-of-sequence) stay in its mask as 1s, as generate had them"
        )


def check_next_turn(cache: PolicyCache, args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse a ``generate`` call on ``cache`` whose inputs would not continue what it has seen."""
    check_left_padding(cache, kwargs.get("attention_mask"))
    seen = cache.get_seq_length()
    ids = generate_input_ids(args, kwargs)
    if seen == 0 or ids is None:
        return
    fix = (
        "Pass the whole conversation so far followed by the new tokens, input_ids = "
        "torch.cat([previous_output.sequences, new_ids], 1) (or only the tokens the cache has not seen, the "
        "previous output's last token first, with an attention_mask of the whole conversation), or start "
        "over on a fresh cache (infertrix.kvcache.new_cache(model)): a compressed cache cannot be rolled back "
        "and prefilled again, its evicted tokens are gone"
    )
    rows = next((lay.keys.shape[0] for lay in cache.evicting_layers if lay.is_initialized), ids.shape[0])
    if ids.shape[0] != rows:
        raise ConfigError(f"generate was given {ids.shape[0]} rows on a cache of {rows} rows. {fix}")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == seen + ids.shape[1]:
        return  # only the new tokens, and a mask of the whole conversation: transformers feeds them all
    if ids.shape[1] <= seen:
        raise ConfigError(
            f"generate was given {ids.shape[1]} tokens on a cache that has already seen {seen}: it takes them as "
            f"the whole conversation, which leaves no new token to feed. {fix}"
        )
    known = cache.seen_tokens()
    if known is None:
        return
    differ = (ids[:, :seen] != known.to(ids.device)).nonzero()
    if differ.numel():
        row, at = differ[0].tolist()
        raise ConfigError(
            f"input_ids do not start with the {seen} tokens this cache has seen (row {row} differs at token {at}: "
            f"{ids[row, at].item()} instead of {known[row, at].item()}), so generate would cut them at the wrong "
            f"place. {fix}. A chat template may re-tokenize the previous answer differently: build the next turn "
            "from the token ids"
        )
