"""``PolicyCache``: the evicting storage plus each full-attention layer's scoring state.

The storage (:class:`~.cache.EvictingCache`) knows nothing of how a policy scores; what a policy keeps
between forwards (recent queries, per-token scores, a deferred compression) is a :class:`LayerState`
per full-attention layer, owned here, next to the layers, so it follows them through ``crop`` and
batch reordering. ``generate`` receives a fresh ``PolicyCache`` after ``optimize`` (see
:mod:`~.attach`); for manual loops get one from :func:`infertrix.kvcache.new_cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..core.generation import left_padding_start
from .cache import EvictingCache

if TYPE_CHECKING:
    from .kivi import KIVI


# queries per forward whose attention probabilities the decode engine hands to a policy ([T, slots] per
# head: a long prompt below prefill_min_tokens would need a prompt x prompt matrix per layer)
ENGINE_OBSERVE_MAX_TOKENS = 64

# LayerState.aux key of stored slots hidden per KV head ([B, H_kv, S] bool, True = the head does not
# attend the slot): a policy that keeps fewer tokens in some KV heads than the layer's shared length
# (AdaKV) hides the rest; the attention pre-hook folds it into the mask, and the engine passes it to
# its attention (``engine_hidden``)
HIDDEN = "hidden"


@dataclass
class CompressionLog:
    """How many layer compression steps a policy ran (prompts too short to compress included) and why
    some kept more than the requested budget (a short prompt under a window the method always keeps,
    say). Shared by every cache one model's ``generate`` receives: ``describe()`` shows it."""

    steps: int = 0
    kept_more: dict[str, int] = field(default_factory=dict)  # reason -> layer compressions

    def note(self, reason: str) -> None:
        self.kept_more[reason] = self.kept_more.get(reason, 0) + 1

    def report(self) -> dict[str, str]:
        if not self.kept_more:
            return {}
        n = sum(self.kept_more.values())
        why = "; ".join(f"{count}x {reason}" for reason, count in self.kept_more.items())
        return {"kept_more_than_budget": f"{n} of {self.steps} layer compression steps since optimize ({why})"}


@dataclass
class LayerState:
    """What a policy keeps for one layer between forwards.

    ``queries``: the most recent post-rotary queries [B, H_q, w, D] attention-based policies score
    with (never more than the layer's stored tokens); ``aux``: per-token state [B, H_kv, S]
    (H2O's accumulated attention) that follows every eviction; ``pending``: the scores of a
    compression deferred to the forward's last layer (DensityKV); ``attend_codes``: this one-token
    step's attention reads the layer's KIVI codes itself (KIVI's attention function), so ``update``
    returns only the full-precision window.
    """

    queries: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    steps_since_compress: int = 0
    pending: tuple | None = None
    attend_codes: bool = False

    def extend(self, stored: int) -> None:
        """Give the tokens stored since the last call (new ones at the end) zero ``aux`` state."""
        for name, t in self.aux.items():
            if t.shape[-1] < stored:
                self.aux[name] = torch.cat([t, t.new_zeros((*t.shape[:2], stored - t.shape[-1]))], dim=-1)

    def keep(self, index: Tensor) -> None:
        """Follow an eviction that kept ``index`` [B, H_kv, K]: ``aux`` follows it, and at most ``K``
        queries stay buffered (not fewer when the method evicted some of its recent tokens: how many a
        row keeps would depend on the batch's other rows; a buffered query's slot is counted from the
        end, so it stays the same for a row alone and in a batch)."""
        self.aux = {name: torch.gather(t, -1, index) for name, t in self.aux.items()}
        if self.queries is not None:
            keep_q = min(self.queries.shape[-2], index.shape[-1])
            self.queries = self.queries[:, :, self.queries.shape[-2] - keep_q :]
        self.steps_since_compress = 0

    def crop(self, n: int) -> None:
        """Follow the removal of the last ``n`` tokens."""
        if n <= 0:
            return
        self.aux = {name: t[..., :-n] for name, t in self.aux.items()}
        if self.queries is not None:
            self.queries = self.queries[:, :, : max(0, self.queries.shape[-2] - n)]

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.aux = {name: fn(t) for name, t in self.aux.items()}
        if self.queries is not None:
            self.queries = fn(self.queries)

    def nbytes(self) -> int:
        total = sum(t.nbytes for t in self.aux.values())
        return total + (self.queries.nbytes if self.queries is not None else 0)


class PolicyCache(EvictingCache):
    """An :class:`EvictingCache` whose full-attention layers follow ``policy`` (a
    :class:`~infertrix.kvcache.KVPolicy`, or None for KIVI alone), with ``states[r]`` the scoring state
    of ``evicting_layers[r]``. ``quant``: a :class:`~infertrix.kvcache.KIVI` config or None; ``log``:
    the :class:`CompressionLog` to count into (a new one when None)."""

    def __init__(self, config, policy=None, quant: KIVI | None = None, log: CompressionLog | None = None) -> None:
        super().__init__(config, quant)
        self.policy = policy
        self.log = CompressionLog() if log is None else log
        self.states = [LayerState() for _ in self.evicting_indices]
        self.rank = {i: r for r, i in enumerate(self.evicting_indices)}  # layer index -> states index
        # the token ids every forward fed, [B, n] chunks (None once a forward fed embeddings or came
        # from elsewhere): the next turn of a chat is checked against them (kvcache/turns.py)
        self.tokens: list[Tensor] | None = []
        self.token_count = 0
        # [B] each row's left padding in position space, from the 2D attention mask of the last forward
        # that passed one (None: no padding seen); a row's budget follows its own length (row_seen)
        self.row_pads: Tensor | None = None
        self.forward_new: int | None = None  # new tokens per row of the causal LM forward running now

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        rank = self.rank.get(layer_idx)
        if rank is not None and self.states[rank].attend_codes:
            return self.layers[layer_idx].append(key_states, value_states)  # no dequantized copy
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def after_attention(self, module, layer_idx: int, hidden: Tensor, position_embeddings: Any, mask: Any) -> None:
        """Run the policy on layer ``layer_idx`` after its attention, then quantize what is due (KIVI)."""
        rank = self.rank[layer_idx]
        self.states[rank].attend_codes = False
        if self.policy is not None:
            self.policy.after_attention(module, self, rank, hidden, position_embeddings, mask)
        if self.states[rank].pending is None:  # a pending compression flushes after it has evicted
            self.layers[layer_idx].flush()

    def after_forward(self, model, input_ids: Tensor | None, attention_mask: Tensor | None,
                      position_ids: Tensor | None) -> bool:
        """After the model's whole forward on this cache: the policy's ``after_forward`` (KVzip re-reads
        the prompt through the model and compresses here); True when it acted."""
        p = self.policy
        if p is None or p.is_noop:
            return False
        return bool(p.after_forward(model, self, input_ids, attention_mask, position_ids))

    def engine_refusal(self, n: int, prefill: bool = False) -> str | None:
        """Why a forward of ``n`` new tokens must run on the module path, or None when the decode
        engine can run it and then call :meth:`after_engine`: the engine hands over the attention of
        the layers it observes (:meth:`engine_observes`) except over KIVI codes; a prompt chunk
        compresses on the module path (the policy recomputes the queries it scores with from the
        attention module's input) unless ``prefill`` (the engine's model has quantized projections,
        whose module-path prefill would round differently per batch): the engine then hands over
        the queries."""
        for r, i in enumerate(self.evicting_indices):
            if HIDDEN in self.states[r].aux and self.layers[i].n_quantized:
                return (f"slots hidden per KV head over layer {i}'s KIVI codes (the engine's KIVI step takes one "
                        "mask per row)")
        p = self.policy
        if p is None or p.is_noop:
            return None
        name = type(p).__name__
        chunk = n >= p.prefill_min_tokens
        if chunk and not prefill:
            return f"a prefill chunk of {n} tokens on a PolicyCache ({name} scores and compresses it on the module path)"
        observed = self.engine_observes(n, prefill) or {}
        if not chunk and observed and n > ENGINE_OBSERVE_MAX_TOKENS:
            return (f"a forward of {n} tokens whose attention {name} reads (the engine hands over the probabilities "
                    f"of at most {ENGINE_OBSERVE_MAX_TOKENS} queries; the module path scores in chunks)")
        for i in observed:
            if self.layers[i].n_quantized:
                return (f"{name} scores layer {i}'s attention over KIVI codes (the engine's KIVI step returns no "
                        "attention probabilities)")
        return None

    def engine_hidden(self) -> dict[int, Tensor] | None:
        """The slots each layer hides per KV head (``HIDDEN``, head-wise budgets), by layer index,
        for the engine's attention (``Runner.forward``'s ``hidden``); None when no layer hides any."""
        out = {}
        for r, i in enumerate(self.evicting_indices):
            if HIDDEN in self.states[r].aux:  # the stored slots' part (as the module path's mask takes it)
                out[i] = self.states[r].aux[HIDDEN][..., : self.layers[i].stored_length]
        return out or None

    def engine_observes(self, n: int, prefill: bool = False) -> dict[int, int | None] | None:
        """The layers whose attention the policy reads in a forward of ``n`` tokens the engine runs
        (every forward of H2O; a due ``decode_interval`` compression of a method scoring by
        attention; with ``prefill``, a prompt chunk's queries), as ``Runner.forward``'s ``observe``
        (None: probabilities and queries; k: the last k queries, -1 all); None when it reads none."""
        p = self.policy
        if p is None or p.is_noop or not (p.observed_queries() or p.score_queries()):
            return None
        if prefill and n >= p.prefill_min_tokens:  # every layer compresses: it scores from the queries
            want = -1 if p.observed_queries() < 0 else max(p.observed_queries(), p.score_queries())
            return {i: want for i in self.evicting_indices}
        layers = {i: None for r, i in enumerate(self.evicting_indices)
                  if p.observed_queries() or (p.decode_interval and self.states[r].steps_since_compress + n >= p.decode_interval)}
        return layers or None

    def after_engine(self, n: int, modules: list | None = None, observed: dict | None = None,
                     pads: Tensor | None = None) -> None:
        """What the attention hooks do after a forward of ``n`` tokens the engine ran: the policy's
        counts, observation and due compressions (:meth:`KVPolicy.after_engine`; ``modules`` the
        attention modules by layer, ``observed`` the attention :meth:`engine_observes` asked for,
        ``pads`` [B] each row's left padding), then KIVI's flush."""
        for i in self.evicting_indices:
            self.after_engine_layer(i, n, modules, observed, pads)

    def after_engine_layer(self, i: int, n: int, modules: list | None = None, observed: dict | None = None,
                           pads: Tensor | None = None) -> None:
        """:meth:`after_engine` for layer ``i`` alone (the engine calls it as soon as the layer has run,
        so a prompt chunk is compressed layer by layer, as on the module path)."""
        rank = self.rank[i]
        if self.policy is not None and not self.policy.is_noop:
            probs, queries = (observed or {}).pop(i, None) or (None, None)  # free the layer's attention
            module = modules[i] if modules is not None else None
            self.policy.after_engine(module, self, rank, n, probs, queries, pads)
        if self.states[rank].pending is None:  # a pending compression flushes after it has evicted
            self.layers[i].flush()

    def visible_slots(self, layer_idx: int, pads: Tensor | None) -> Tensor | None:
        """[B, stored] bool, False for layer ``layer_idx``'s kept pads and fillers (its first
        ``first_slots(pads)`` slots, see kvcache/cache.py), or None when no row holds one."""
        layer = self.layers[layer_idx]
        first = layer.first_slots(pads)
        if first is None:
            return None
        return torch.arange(layer.stored_length, device=first.device)[None] >= first[:, None]

    def note_pads(self, mask: Tensor | None, new: int) -> None:
        """Record the ``new`` tokens per row of a forward about to run and each row's left padding from
        its 2D attention mask [B, seen + ``new``] (kept when the mask is missing or is not left
        padding: the policy refuses the latter)."""
        self.forward_new = new
        if not isinstance(mask, Tensor):
            return
        start = left_padding_start(mask, self.get_seq_length() + new)
        if start is not None:
            self.row_pads = start if bool(start.any()) else None

    def row_seen(self, layer_idx: int) -> list[int]:
        """Each row's tokens seen by layer ``layer_idx``, its left padding not counted (one entry per row)."""
        seen = self.layers[layer_idx].cumulative_length
        if self.row_pads is None:
            return [seen] * self.layers[layer_idx].keys.shape[0]
        return [max(0, seen - int(p)) for p in self.row_pads.tolist()]

    # -- the tokens seen ---------------------------------------------------------------------------
    def note_tokens(self, ids: Tensor | None) -> None:
        """Record the input ids [B, n] of a forward about to run on this cache (None: it feeds
        embeddings); the record is dropped for good once it no longer matches what the cache has seen
        (a forward that did not pass through the model's hooks, say)."""
        if self.tokens is None:
            return
        rows = self.tokens[0].shape[0] if self.tokens else None
        fits = ids is not None and ids.dim() == 2 and rows in (None, ids.shape[0])
        if not fits or self.token_count != self.get_seq_length():
            self.tokens = None
            return
        self.tokens.append(ids.detach())
        self.token_count += ids.shape[1]
        if len(self.tokens) >= 256:  # one tensor rather than one per decoded token
            self.tokens = [torch.cat(self.tokens, 1)]

    def seen_tokens(self) -> Tensor | None:
        """[B, seen] the token ids this cache has seen, in order, or None when unknown."""
        if not self.tokens or self.token_count != self.get_seq_length():
            return None
        self.tokens = [torch.cat(self.tokens, 1)]
        return self.tokens[0]

    def _map_tokens(self, fn: Callable[[Tensor], Tensor]) -> None:
        ids = self.seen_tokens()
        if self.tokens:
            self.tokens = None if ids is None else [fn(ids)]
            self.token_count = self.get_seq_length()

    def crop(self, max_length: int) -> None:
        ids = self.seen_tokens()
        for i, layer in enumerate(self.layers):
            seen = layer.get_seq_length()
            layer.crop(max_length)
            if i in self.rank:
                self.states[self.rank[i]].crop(seen - layer.get_seq_length())
        if self.tokens:
            self.tokens = None if ids is None else [ids[:, : self.get_seq_length()]]
            self.token_count = self.get_seq_length()

    def _map_states(self, fn: Callable[[Tensor], Tensor]) -> None:
        for state in self.states:
            state.map_batch(fn)
        self._map_tokens(fn)
        if self.row_pads is not None:
            self.row_pads = fn(self.row_pads)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.states = [LayerState() for _ in self.evicting_indices]
        self.tokens, self.token_count = [], 0
        self.row_pads = None

    def state_bytes(self) -> int:
        """Bytes of the policy's own per-token state (accumulated scores, recent queries)."""
        return sum(state.nbytes() for state in self.states)
