"""A smaller model with the same tokenizer drafts; the target verifies (classic speculative decoding).

Leviathan, Kalman & Matias (ICML 2023, https://arxiv.org/abs/2211.17192); Chen et al. (2023,
https://arxiv.org/abs/2302.01318). The draft model keeps its own KV cache with per-row positions
(:class:`~.ragged.RaggedKV`), rolled back to the verified prefix before each draft. Under sampling
it samples from its own distribution shaped by the call's history-free warpers (temperature,
top-k/top-p...) and hands those probabilities to the verifier; under greedy it drafts its argmax.
Drafting stops early for a row when the draft's top probability falls below ``confidence``
(the confidence-based early exit of DEL / SWIFT-style drafters), and with ``adaptive`` the draft
length is the one with the most expected tokens per second given the running acceptance rate, the
measured seconds per draft token and the measured verification cost per width
(:mod:`~.budget`); when no length pays, the step is a plain one (with a 1-token probe every
``PROBE_EVERY`` such steps, so the acceptance estimate can recover). Lossless; costs the draft
model's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import require_causal_lm
from ..core.registry import register_transform
from ..core.transform import ConfigError, UnsupportedModelError
from ..kvcache.cache import GrowingCache
from ..skip import SkipPlan
from .budget import AcceptanceRate, best_length, weight_bytes
from .drafter import Draft, DraftContext, Drafter
from .lean import EngineDraftKV, engine_draft_kv, lean_supported
from .ragged import RaggedKV
from .shared import held_state, restore_shared, share_cache
from .transform import SpeculativeDecoding


def _vocab_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def check_same_vocabulary(target: nn.Module, draft: nn.Module, what: str = "DraftModel") -> None:
    """Raise UnsupportedModelError unless ``draft`` scores the same token ids as ``target``."""
    vt, vd = _vocab_rows(target), _vocab_rows(draft)
    if vt != vd:
        raise UnsupportedModelError(
            f"{what}: the draft model's vocabulary has {vd} tokens but the model's has {vt}; "
            "the draft must use the same tokenizer (pick a smaller model of the same family, or use "
            "PromptLookup, which needs no draft model)"
        )
    for attr in ("eos_token_id", "bos_token_id"):
        a = getattr(target.generation_config, attr, None)
        b = getattr(draft.generation_config, attr, None)
        if a is not None and b is not None and a != b:
            raise UnsupportedModelError(
                f"{what}: the draft model's {attr} is {b} but the model's is {a}: they do not share a "
                "tokenizer; pick a draft model of the same family (same tokenizer)"
            )


PROBE_EVERY = 8  # plain steps in a row after which a 1-token draft re-measures acceptance


class _RaggedDraftKV(RaggedKV):
    def last_logits(self, feed: list[list[int]]) -> torch.Tensor:
        logits = self.extend(feed)
        return torch.stack([logits[b, max(len(feed[b]) - 1, 0)] for b in range(len(feed))])


class DraftModelDrafter(Drafter):
    """Drafts with ``draft`` (its own KV cache); ``context()``, when given, is entered around every
    draft forward (self-speculation: the target itself under a skip plan or another precision)."""

    # after plain steps its first draft also runs the draft over the tokens it skipped (the whole
    # prompt, on a call's first draft): the never-slower guard does not count that step (gain.py)
    catches_up = True

    def __init__(
        self,
        draft: nn.Module,
        num_tokens: int,
        confidence: float,
        adaptive: bool,
        max_tokens: int,
        context: Callable[[], AbstractContextManager] | None = None,
        share: bool = False,
    ):
        self.draft = draft
        self.share = share  # draft on the model's own KV cache where it can (share_cache)
        self.share_problem: str | None = None  # why it could not, this call
        self.path = "none yet"  # where drafts run: the engine, or the module path and why
        self.context = context
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        self.confidence = confidence
        self.adaptive = adaptive
        self.rate = AcceptanceRate()
        self.token_seconds: float | None = None  # moving average of one draft forward
        self.skipped = 0

    def start(self, model: nn.Module, ctx: DraftContext) -> None:
        super().start(model, ctx)
        self.shared: tuple[RaggedKV, Callable] | None = None
        skip = self.shared_skip()
        if self.share and self.context is not None and skip is None:
            self.share_problem = "the draft runs under a context that changes the model"
        elif self.share:
            shared = share_cache(self.draft, model, ctx.target_kv, skip)
            if isinstance(shared, tuple):
                self.shared, self.path = shared[:2], shared[2]
                if skip is not None and skip() is not None:
                    self.path = f"engine (skipping {skip().units()}), on the model's KV cache"
                self.catches_up = False  # nothing to catch up on: the model's cache holds the context
            else:
                self.share_problem = shared
        if self.shared is None:
            self.reset_cache()
        # what a draft forward costs against a step of the model, first estimated from the weight
        # bytes each reads (decoding is bandwidth-bound); unknown for a draft that is the model under
        # a context (self-speculation), whose bytes are the model's
        self.cost_ratio: float | None = None
        self.prompt_catch_up: float | None = None  # seconds of the first draft forward (over the prompt)
        if self.context is None and self.draft is not model:
            self.cost_ratio = weight_bytes(self.draft) / max(weight_bytes(model), 1)

    def length(self, limits: list[int]) -> int:
        """Tokens to draft this step (the same bound for every row)."""
        if not self.adaptive:
            return self.num_tokens
        live = [lim for lim in limits if lim > 0]
        if not live:
            return 0
        k = best_length(
            [self.rate.rate] * len(live), [min(lim, self.max_tokens) for lim in live], self.ctx.cost,
            draft_seconds=self.token_seconds if self.token_seconds is not None else 0.0,
        )
        if k == 0:
            self.skipped += 1
            if self.skipped >= PROBE_EVERY:
                self.skipped, k = 0, 1
        return k

    def shared_skip(self) -> Callable[[], SkipPlan | None] | None:
        """The skip plan a draft on the model's own cache runs, as a callable (None: no plan)."""
        return None

    def engine_skip(self) -> tuple[bool, SkipPlan | None]:
        """(whether drafts may run on the engine, the skip plan they follow there): a context
        changes the model, so a drafter with one keeps its own forward."""
        return self.context is None, None

    def reset_cache(self) -> None:
        """Start the draft's KV cache afresh (the next proposal re-reads each row's tokens); a draft on
        the model's cache has none."""
        if getattr(self, "shared", None) is not None:
            return
        dev = next(self.draft.parameters()).device
        batch = self.ctx.batch_size
        self.cached: list[list[int]] = [[] for _ in range(batch)]
        lean, skip = self.engine_skip()
        kv = engine_draft_kv(self.draft, batch, self.ctx.pad_token_id, skip) if lean else None
        if kv is not None:
            units = skip.units() if skip is not None else ""
            self.kv, self.path = kv, f"engine (skipping {units})" if units else "engine"
            return
        self.path = "module: " + ("a context changes the model" if not lean else lean_supported(self.draft))
        self.kv = _RaggedDraftKV(self.draft, GrowingCache(self.draft.config), self.ctx.pad_token_id)
        self.kv.mask = torch.zeros((batch, 0), dtype=torch.long, device=dev)
        self.kv.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.kv.batch = batch

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logits = logits.to(torch.float32)
        if self.ctx.do_sample:
            q = torch.softmax(self.ctx.warp(logits), -1)
            tok = torch.multinomial(q, 1).squeeze(1)
            conf = q.max(-1).values
            return tok, q, conf
        tok = logits.argmax(-1)
        conf = torch.softmax(logits, -1).max(-1).values
        return tok, None, conf

    @torch.no_grad()
    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        if self.shared is not None:
            return self._propose_shared(seqs, limits)
        batch = len(seqs)
        keep = []
        for b in range(batch):
            have, s = self.cached[b], seqs[b]
            n = 0
            while n < len(have) and n < len(s) - 1 and have[n] == s[n]:
                n += 1
            keep.append(n)
            self.cached[b] = have[:n]
        if isinstance(self.kv, RaggedKV):  # a row with nothing left to draft never drafts again
            self.kv.retire([b for b in range(batch) if limits[b] <= 0])
        self.kv.rollback(keep)
        k = self.length(limits)
        want = [min(k, lim) for lim in limits]
        if max(want) <= 0:
            return self._nothing(batch)
        feed = [seqs[b][keep[b]:] if want[b] > 0 else [] for b in range(batch)]
        engine = isinstance(self.kv, EngineDraftKV)  # a skip plan there is the runner's, not a context

        def forward(feed: list[list[int]]) -> torch.Tensor:
            with self.context() if self.context is not None and not engine else nullcontext():
                last = self.kv.last_logits(feed)
            for b in range(batch):
                self.cached[b].extend(feed[b])
            return last

        return self._draft(feed, want, forward)

    def _propose_shared(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        """Draft on the model's own cache (QSpec-style, see :meth:`share_cache`): feed each row's
        newest token, then each drafted token, through the draft's forward; then cut the cache back
        to what it held, so the verification forward finds exactly the cache it would have found."""
        kv, forward_fn = self.shared
        k = self.length(limits)
        want = [min(k, lim) for lim in limits]
        if max(want) <= 0:
            return self._nothing(len(seqs))
        held = held_state(kv)
        try:
            with kv.forward_with(forward_fn):
                return self._draft([[seqs[b][-1]] if want[b] > 0 else [] for b in range(len(seqs))], want,
                                   lambda feed: kv.extend(feed, keep=1)[:, 0])
        finally:
            restore_shared(kv, held)

    def note_token_seconds(self, seconds: float) -> None:
        """Fold one draft token's measured seconds into ``token_seconds`` (a moving average)."""
        ts = self.token_seconds
        self.token_seconds = seconds if ts is None else ts + 0.3 * (seconds - ts)

    def _nothing(self, batch: int) -> Draft:
        return Draft([[] for _ in range(batch)], None if not self.ctx.do_sample else [torch.empty(0) for _ in range(batch)])

    def _draft(self, feed: list[list[int]], want: list[int], forward: Callable[[list[list[int]]], torch.Tensor]) -> Draft:
        """Draft up to ``want[b]`` tokens per row: ``forward(feed)`` gives each row's logits after
        its fed tokens; a row stops at its length or below ``confidence``."""
        batch = len(feed)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        going = [want[b] > 0 for b in range(batch)]
        while True:
            t0 = time.perf_counter()
            last = forward(feed)
            spent = time.perf_counter() - t0
            if self.prompt_catch_up is None and max(len(f) for f in feed) > 1:
                self.prompt_catch_up = spent  # the call's first draft forward runs over the prompt
            if max(len(f) for f in feed) == 1:
                # the cost of one draft token: a forward that also catches up on the verified tokens
                # (the whole prompt, on the first draft) would make drafting look far dearer than it is
                self.note_token_seconds(spent)
            tok, q, conf = self._pick(last)
            feed = [[] for _ in range(batch)]
            for b in range(batch):
                if not going[b]:
                    continue
                tokens[b].append(int(tok[b]))
                if q is not None:
                    probs[b].append(q[b])
                if len(tokens[b]) >= want[b] or float(conf[b]) < self.confidence:
                    going[b] = False
                else:
                    feed[b] = [tokens[b][-1]]
            if not any(going):
                break
        stacked = None
        if self.ctx.do_sample:
            stacked = [torch.stack(p) if p else torch.empty(0) for p in probs]
        return Draft(tokens, stacked)

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        for d, a in zip(drafted, accepted, strict=True):
            self.rate.update(d, a)


@register_transform("draft_model", "assisted")
@dataclass
class DraftModel(SpeculativeDecoding):
    """Speculative decoding with a smaller draft model of the same tokenizer (Leviathan et al.
    2023, https://arxiv.org/abs/2211.17192). Lossless; costs the draft's weights and KV cache.

    Fields:
      draft: the draft model (a transformers causal LM sharing the tokenizer), or a name for
        ``infertrix.models.load``.
      num_tokens: draft length when ``adaptive`` is False.
      adaptive: draft the length (0 to ``max_tokens``) with the most expected tokens per second,
        from the running acceptance rate and the measured draft and verification costs.
      confidence: stop drafting a row when the draft's top probability falls below this
        (0 disables).
    """
    use_when = "a much smaller model with the same tokenizer exists: lossless"

    primary = "num_tokens"
    bench_recipe: ClassVar[str | None] = None  # needs a model object, not a recipe string
    draft: Any = field(default=None, repr=False)
    num_tokens: int = 5
    adaptive: bool = True
    max_tokens: int = 12
    confidence: float = 0.3

    def validate(self) -> None:
        if self.draft is None:
            raise ConfigError("DraftModel needs a draft model: DraftModel(draft=small_model)")
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"DraftModel needs 1 <= num_tokens <= max_tokens, got num_tokens={self.num_tokens}, "
                f"max_tokens={self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"DraftModel confidence must be in [0, 1), got {self.confidence}")
        if isinstance(self.draft, str):
            from .. import models

            self.draft = models.load(self.draft)[0]
        if not isinstance(self.draft, nn.Module):
            raise ConfigError(f"DraftModel.draft must be a model or a model name, got {type(self.draft).__name__}")

    def check_model(self, model: nn.Module) -> None:
        require_causal_lm(self.draft, "DraftModel's draft")
        check_same_vocabulary(model, self.draft)

    def drafter_report(self, model: nn.Module) -> dict[str, Any]:
        return {"draft model": f"{type(self.draft).__name__} ({sum(p.numel() for p in self.draft.parameters()):,} parameters)"}

    def make_drafter(self, model: nn.Module) -> Drafter:
        self.draft.eval()
        return DraftModelDrafter(self.draft, self.num_tokens, self.confidence, self.adaptive, self.max_tokens)
