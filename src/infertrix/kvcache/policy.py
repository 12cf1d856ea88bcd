"""``KVPolicy``: the shared base of every eviction/merging method; a method only writes ``score``.

Everything a method has in common lives here once (the kvpress pattern): the budget (a compression
ratio or a token count, uniform or per layer), when to compress (after every multi-token forward, i.e.
prefill chunks, and optionally every ``decode_interval`` decoding steps), GQA (score per query head,
average over each KV head's group, keep per KV head), padding (pads score -inf, so they go first),
optional D2O-style merging of evicted tokens, and the compact gather. A method's file holds a
dataclass config citing its paper and one ``score(ctx) -> [B, H_kv, S]`` (higher = keep); a method
that reads recent queries says how many (``score_queries``), one that accumulates over every forward
overrides ``observe`` and ``observed_queries`` (H2O), and budgets other than uniform override
``layer_target`` (PyramidKV) or ``compress_layer`` (DensityKV), a method that needs the whole model's
forward before it can score (KVzip) ``after_forward``, and head-wise budgets (AdaKV) ``evict``. Nothing
else is meant to be overridden.

Where this departs from the design note: every method, attention-based or not, is run from the one
forward hook on the attention module rather than score-only ones from the layer's ``update``, because
``update`` does not see the attention mask and so cannot tell pads from tokens; the hook does (and
it sees the layer's input, from which attention-based methods recompute the few queries they need).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Applied, ConfigError, Stage, Transform
from .attach import check_supported_model, kv_setup
from .attention import compute_queries
from .context import ScoreContext, held, over_budget, visible_keys
from .merge import merge_evicted
from .policy_cache import LayerState, PolicyCache
from .rows import best, keep_counts, row_budgets

# The fewest tokens any policy keeps per row and KV head. Fewer lose both the attention sinks (StreamingLLM
# keeps 4 first tokens) and a recent window, and greedy decoding degenerates into repeating one token
# (H2O with budget=1 on SmolLM2: "looked looked looked ..."). A fixed budget below it is refused; a ratio
# that falls below it on a short prompt keeps it instead and says so in describe().
MIN_BUDGET = 8


@dataclass
class KVPolicy(Transform):
    """Base of eviction policies (not registered itself). Fields shared by every method:

    - ``compression``: fraction of the tokens to evict, in [0, 1); 0 keeps everything and is
      bit-identical to the unoptimized model. The budget is ``ceil((1 - compression) * seen)`` tokens
      per row and KV head, ``seen`` counting left padding (every row gets the same budget).
    - ``budget``: a token count instead of a ratio (overrides ``compression`` when set); at least
      :meth:`min_budget` (``MIN_BUDGET`` = 8 tokens, or the window a method always keeps).
    - ``decode_interval``: 0 compresses only after prefill chunks; N > 0 also compresses back to the
      budget every N decoded tokens (long generations).
    - ``prefill_min_tokens``: a forward of at least this many new tokens is a prefill chunk and
      compresses; shorter ones (single decoding steps, speculative verification of a few drafts)
      count as decoding, so ``crop`` can roll them back exactly.
    - ``merge``: merge each evicted token into its most similar kept token (D2O, Wan et al. 2024,
      https://arxiv.org/abs/2406.13035) instead of dropping it, when their key cosine similarity is at
      least ``merge_threshold``.
    """

    stage: ClassVar[Stage] = Stage.CACHE
    conflict_group: ClassVar[str | None] = "kv cache policy"
    primary: ClassVar[str | None] = "compression"

    compression: float = 0.5
    budget: int | None = None
    decode_interval: int = 0
    prefill_min_tokens: int = 16
    merge: bool = False
    merge_threshold: float = 0.5

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return None  # each rank scores and evicts its own KV heads; budgets depend only on lengths

    # -- configuration -------------------------------------------------------------------------------
    def validate(self) -> None:
        name = type(self).__name__
        if (
            not isinstance(self.compression, int | float)
            or not 0.0 <= float(self.compression) < 1.0
        ):
            raise ConfigError(
                f"{name}.compression must be in [0, 1) (the fraction of tokens evicted), got {self.compression!r}; "
                "1 would evict every token, use e.g. 0.5"
            )
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(
                f"{name}.budget must be a positive token count or None, got {self.budget!r}"
            )
        if not isinstance(self.decode_interval, int) or self.decode_interval < 0:
            raise ConfigError(
                f"{name}.decode_interval must be an int >= 0, got {self.decode_interval!r}"
            )
        if not isinstance(self.prefill_min_tokens, int) or self.prefill_min_tokens < 2:
            raise ConfigError(
                f"{name}.prefill_min_tokens must be an int >= 2, got {self.prefill_min_tokens!r}"
            )
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ConfigError(
                f"{name}.merge_threshold is a cosine similarity in [-1, 1], got {self.merge_threshold}"
            )

    def __post_init__(self) -> None:
        super().__post_init__()
        # a fixed budget that cannot hold the method's fixed parts would fail or degenerate on every
        # call: refuse it here, before optimize changes the model
        least = self.min_budget()
        if self.budget is not None and self.budget < least:
            tokens, what, fix = self.fixed_part()
            why = (
                f"the {tokens} tokens it always keeps ({what})"
                if tokens >= MIN_BUDGET
                else f"the minimum of {MIN_BUDGET} tokens (fewer degenerate into repeating one token)"
            )
            fix = f" or {fix}" if tokens >= MIN_BUDGET and fix else ""
            raise ConfigError(
                f"{type(self).__name__}.budget={self.budget} cannot hold {why}; use budget >= {least}{fix}, "
                "or a compression ratio"
            )

    @property
    def is_noop(self) -> bool:
        return self.budget is None and self.compression == 0

    def requested(self, seen: int) -> int:
        """The budget as configured after ``seen`` tokens: ``budget``, or the ``compression`` ratio."""
        if self.budget is not None:
            return min(seen, self.budget)
        return min(seen, max(1, math.ceil((1.0 - float(self.compression)) * seen - 1e-9)))

    def target(self, seen: int) -> int:
        """Tokens kept per row and KV head after ``seen`` tokens (uniform budget): the requested budget,
        raised to :meth:`min_budget` (never above ``seen``) when a short prompt brings it lower."""
        return max(self.requested(seen), min(seen, self.min_budget()))

    def layer_target(self, seen: int, layer_rank: int, num_layers: int) -> int:
        """Per-layer budget; uniform here, PyramidKV overrides it."""
        return self.target(seen)

    def fixed_part(self) -> tuple[int, str, str]:
        """(tokens a method always keeps, what they are, how to keep fewer): a window, sinks; none here."""
        return 0, "", ""

    def min_budget(self) -> int:
        """The fewest tokens kept per row and KV head: ``MIN_BUDGET`` or the method's fixed part."""
        return max(MIN_BUDGET, self.fixed_part()[0])

    def budget_shortfall(self) -> str:
        """Why a compression kept more than the requested budget (for describe())."""
        tokens, what, _ = self.fixed_part()
        if tokens >= MIN_BUDGET:
            return f"{type(self).__name__} always keeps {tokens} tokens ({what}), more than a short prompt's budget"
        return f"a short prompt's budget is below the minimum of {MIN_BUDGET} tokens"

    # -- the method ----------------------------------------------------------------------------------
    def score(self, ctx: ScoreContext) -> Tensor:
        """[B, H_kv, S] importance of each stored token (higher = keep)."""
        raise NotImplementedError

    def score_queries(self) -> int:
        """How many recent post-rotary queries ``score`` reads (``ctx.queries``); 0: none."""
        return 0

    def observed_queries(self) -> int:
        """Queries of every forward ``observe`` needs (-1: all of them); 0: it does not observe."""
        return 0

    def observe(self, ctx: ScoreContext, new_queries: Tensor | None) -> None:
        """Called after every forward when ``observed_queries`` is not 0 (H2O accumulates attention here)."""

    def after_forward(self, model: nn.Module, cache: PolicyCache, input_ids: Tensor | None,
                      attention_mask: Tensor | None, position_ids: Tensor | None) -> bool:
        """Called after the model's whole forward on ``cache`` with its inputs (``replay`` calls it too):
        a method that needs every layer before it compresses (KVzip runs a second forward) acts here,
        on layers whose ``compress_layer`` left a ``pending`` state. Returns whether it changed the cache."""
        return False

    # -- transform -----------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        check_supported_model(model, self, needs_queries=bool(self.score_queries() or self.observed_queries()))

    def apply(self, model: nn.Module) -> Applied:
        setup = kv_setup(model, create=True)
        undo = setup.set_policy(self)
        return Applied(self, undo=undo, report=setup.report)

    # -- called by the attention forward hook ------------------------------------------------------
    def after_attention(self, module, cache: PolicyCache, rank: int, hidden: Tensor, position_embeddings, mask):
        """Observe and, when due, compress layer ``rank`` of ``cache`` after its attention."""
        due = None if self.is_noop else self.count_forward(cache, rank, hidden.shape[1])
        if due is None:
            return
        layer, state = cache.evicting_layers[rank], cache.states[rank]
        new_q = self._new_queries(module, layer.stored_length, state, hidden, position_embeddings)
        keys, values = layer.full_keys_values()
        visible = visible_keys(mask, keys.shape[-2])
        if visible is not None and bool((visible[:, 1:] < visible[:, :-1]).any()):
            raise ConfigError(
                f"{type(self).__name__} needs left padding (pads before each row's tokens), but the attention "
                "mask hides tokens after visible ones; set tokenizer.padding_side = 'left'"
            )
        fillers = cache.visible_slots(cache.evicting_indices[rank], None)  # rows' lead fillers (rows.py)
        if fillers is not None:
            visible = fillers if visible is None else visible & fillers
        ctx = ScoreContext(module, cache, rank, keys, values, state.queries, visible, float(module.scaling))
        self.observe(ctx, new_q)
        if due:
            self.compress_layer(ctx)

    def after_engine(self, module, cache: PolicyCache, rank: int, n: int, probs: Tensor | None,
                     queries: Tensor | None, pads: Tensor | None) -> None:
        """:meth:`after_attention` on a forward of ``n`` tokens the decode engine ran: its attention
        ``probs`` [B, H_q, n, S] and post-rotary ``queries`` [B, n, H_q, D] (None where the layer was
        not observed, ``PolicyCache.engine_observes``) stand in for the module's input; ``pads`` [B]:
        each row's left padding."""
        due = None if self.is_noop else self.count_forward(cache, rank, n)
        if due is None:
            return
        layer, state = cache.evicting_layers[rank], cache.states[rank]
        new_q = None
        if queries is not None:
            new_q = self._buffer_queries(state, layer.stored_length, queries.transpose(1, 2), n)
        keys, values = layer.full_keys_values()
        visible = cache.visible_slots(cache.evicting_indices[rank], pads)
        ctx = ScoreContext(module, cache, rank, keys, values, state.queries, visible, float(module.scaling),
                           probs=probs)
        self.observe(ctx, new_q)
        if due:
            self.compress_layer(ctx)

    def count_forward(self, cache: PolicyCache, rank: int, n: int) -> bool | None:
        """Count a forward of ``n`` tokens on layer ``rank``: None when it neither scores nor
        compresses (nothing more to do after it), else whether a compression is due."""
        layer, state = cache.evicting_layers[rank], cache.states[rank]
        state.extend(layer.stored_length)
        due = n >= self.prefill_min_tokens  # prefill chunks compress; shorter forwards count as decoding
        if not due and layer.cumulative_length == n and self.requested(n) < n:
            # a whole prompt shorter than prefill_min_tokens is kept as it is: say so
            cache.log.steps += 1
            cache.log.note(f"prompts shorter than prefill_min_tokens={self.prefill_min_tokens} are not compressed")
        if not due:
            state.steps_since_compress += n
            due = bool(self.decode_interval) and state.steps_since_compress >= self.decode_interval
            if not due and not self.observed_queries():
                if self.decode_interval == 0:
                    state.queries = None  # not kept up to date while decoding: drop rather than go stale
                return None
        return due

    def _new_queries(self, module, stored: int, state: LayerState, hidden: Tensor, position_embeddings):
        """This forward's queries ``observe`` needs, after buffering the ones ``score`` reads."""
        wanted = self.observed_queries() or self.score_queries()
        if wanted == 0:
            return None
        n = hidden.shape[1]
        take = n if wanted < 0 else min(n, wanted)
        return self._buffer_queries(state, stored, compute_queries(module, hidden[:, -take:], position_embeddings), n)

    def _buffer_queries(self, state: LayerState, stored: int, new_q: Tensor, n: int) -> Tensor | None:
        """Buffer the ones ``score`` reads of a forward's last queries ``new_q`` [B, H_q, m, D] (of its
        ``n``); returns those ``observe`` needs."""
        wanted = self.observed_queries() or self.score_queries()
        if wanted == 0:
            return None
        new_q = new_q[:, :, -(n if wanted < 0 else min(n, wanted)) :]
        keep = self.score_queries()
        if keep > 0:
            buf = new_q[:, :, -keep:] if state.queries is None else torch.cat([state.queries, new_q[:, :, -keep:]], 2)
            state.queries = buf[:, :, -min(keep, stored) :].detach()
        return new_q

    def compress_layer(self, ctx: ScoreContext) -> None:
        """Compress one layer back to its budget (after a prefill chunk, or every decode_interval)."""
        layer = ctx.layer
        targets = self.row_targets(ctx.cache, ctx.layer_rank)
        if not over_budget(targets, ctx.keys.shape[-2], ctx.visible):
            ctx.state.steps_since_compress = 0  # the next check is decode_interval away, whatever the other rows
            if self.decode_interval == 0:
                ctx.state.queries = None  # kept tokens only: drop the scoring state as evict does
            return
        ctx.target = targets[0] if len(set(targets)) == 1 else torch.tensor(targets, device=ctx.keys.device)
        self.evict(layer, ctx.state, self.score(ctx), targets, ctx.visible, ctx.keys, ctx.values)

    def row_targets(self, cache: PolicyCache, rank: int) -> list[int]:
        """Tokens each row keeps in layer ``rank`` at this compression: its :meth:`layer_target` for the
        tokens the row has seen (its left padding not counted, so a padded row keeps what it keeps alone),
        or all of them for a row whose share of this prefill is shorter than ``prefill_min_tokens`` (alone
        it would not compress, with ``decode_interval`` 0); counted in ``cache.log`` as one step."""
        idx, num = cache.evicting_indices[rank], len(cache.states)
        seen = cache.row_seen(idx)
        new = cache.forward_new
        short = [self.decode_interval == 0 and new is not None and min(new, s) < self.prefill_min_tokens for s in seen]
        targets = [s if skip else self.layer_target(s, rank, num) for s, skip in zip(seen, short, strict=True)]
        compressed = [s for s, skip in zip(seen, short, strict=True) if not skip] or seen[:1]
        self.log_step(cache.log, min(compressed))
        if any(short):
            cache.log.note(f"prompts shorter than prefill_min_tokens={self.prefill_min_tokens} are not compressed")
        return targets

    def log_step(self, log, seen: int) -> None:
        """Count one layer compression step after ``seen`` tokens and whether its budget was raised."""
        log.steps += 1
        if self.requested(seen) < self.target(seen):
            log.note(self.budget_shortfall())

    def evict(self, layer, state: LayerState, scores: Tensor, target: int | list[int], visible: Tensor | None,
              keys: Tensor | None = None, values: Tensor | None = None) -> None:
        """Keep the ``target`` highest-scoring tokens of ``layer`` (pads out first), merged or not;
        ``target``: one count, or one per row (rows keeping fewer than the most get lead fillers,
        :mod:`~.rows`); ``keys``/``values`` are the layer's full-precision states (read from it when None)."""
        if keys is None:
            keys, values = layer.full_keys_values()
        scores = scores.float()
        if visible is not None:
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))  # pads go first
        if isinstance(target, list):  # a row holding fewer keeps them all
            target = [min(t, h) for t, h in zip(target, held(len(target), scores.shape[-1], visible), strict=True)]
        if isinstance(target, list) and len(set(target)) > 1:
            keep_counts(layer, state, scores, row_budgets(target, scores.shape[1], scores.device), keys, values,
                        self.merge_threshold if self.merge else None, visible)
            if self.decode_interval == 0:
                state.queries = None
            return
        target = target[0] if isinstance(target, list) else target
        keep = best(scores, target)[1].sort(dim=-1).values
        if self.merge:
            keys, values = merge_evicted(keys, values, keep, visible, self.merge_threshold)
        layer.compress(keep, keys, values)
        state.keep(keep)
        if self.decode_interval == 0:
            state.queries = None  # no compression before the next prompt chunk, which brings its own queries
