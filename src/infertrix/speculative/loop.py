"""The speculative decoding loop, plugged into ``generate`` as its ``custom_generate`` callable.

transformers 5 lets ``generate(custom_generate=callable)`` run a caller's decoding loop after it
has prepared everything else: the callable receives the model, the prompt ids, the *prepared*
logits processors and stopping criteria (temperature, top-k/top-p, eos, max length, stop
strings...), the generation config and the model kwargs (attention mask, cache). This loop
replaces only the token-by-token part:

  prefill -> first token (exactly as ``generate``) -> repeat: drafter proposes per row ->
  one forward of [last token, drafts] per row -> logits processors per position ->
  :mod:`.verify` accepts per row -> cache rollback (:mod:`.ragged`) -> stopping criteria per
  emitted token (:mod:`.rows`) -> streamer.

Rows of a batch advance by different amounts; each row's tokens are kept separately and the
result is assembled as ``generate`` would: finished rows padded with the pad token when an eos
criterion is present, otherwise every row generated up to the same length. ``streamer.put``
receives one ``[batch]`` column of tokens at a time, as from ``generate``. Not supported (clear
error): beam search, ``output_scores``/``output_logits``/attentions/hidden states, encoder-decoder
models, ``inputs_embeds``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.generation import logits_process as lp

from ..core.generation import cache_argument
from ..core.transform import ConfigError, UnsupportedModelError
from ..kvcache.cache import GrowingCache
from ..kvcache.capabilities import capabilities
from .aligned import AlignedKV, engine_rows
from .budget import VerifyCost
from .drafter import DraftContext, Drafter, window_reader
from .ragged import RaggedKV
from .rows import Rows, Stopper, emit
from .stats import SpeculativeStats, StatsRecord
from .tree import tree_problem, tree_step
from .verify import verify_greedy, verify_sampling

# Processors whose output depends only on the scores, never on the token history: they can be
# applied to all draft positions of all rows in one batched call.
HISTORY_FREE = tuple(
    getattr(lp, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(lp, name)
)


def _history_free(processors) -> bool:
    return all(isinstance(p, HISTORY_FREE) for p in processors)


class SpeculativeGenerate:
    """The ``custom_generate`` callable; ``make_drafter()`` gives a fresh drafter per call."""

    def __init__(self, make_drafter: Callable[[], Drafter], record: StatsRecord):
        self.make_drafter = make_drafter
        self.record = record
        # measured verification cost per width, per batch size, kept across calls
        self.costs: dict[int, VerifyCost] = {}

    # The signature matters: transformers passes the keys that `_sample` lacks (here
    # `infertrix_streamer`, which the generate hook fills with the caller's `streamer`).
    def __call__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        infertrix_streamer=None,
        **model_kwargs,
    ) -> Tensor:
        self._check(model, generation_config, model_kwargs)
        stats = SpeculativeStats(calls=1)
        try:
            out = self._run(
                model, input_ids, logits_processor, stopping_criteria, generation_config,
                infertrix_streamer, model_kwargs, stats,
            )
        finally:
            self.record.last = stats
            self.record.total.add(stats)
        if generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=out)
        return out

    @staticmethod
    def _check(model, generation_config, model_kwargs) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise UnsupportedModelError("speculative decoding supports decoder-only models only")
        if generation_config.num_beams and generation_config.num_beams > 1:
            raise ConfigError(
                f"speculative decoding does not do beam search (num_beams={generation_config.num_beams}); "
                "pass num_beams=1, or restore(model) to use beam search"
            )
        wanted = [
            k for k in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
            if generation_config.return_dict_in_generate and getattr(generation_config, k, False)
        ]
        if wanted:
            raise ConfigError(
                f"speculative decoding returns sequences only; drop {', '.join(wanted)} "
                "(or restore(model) to get per-step scores)"
            )
        if model_kwargs.get("inputs_embeds") is not None:
            raise ConfigError("speculative decoding needs input_ids, not inputs_embeds")

    def _run(self, model, input_ids, processors, criteria, cfg, streamer, model_kwargs, stats) -> Tensor:
        """Prefill and pick the first token, then draft-verify rounds until every row has stopped."""
        batch, prompt_len = input_ids.shape
        pad = cfg._pad_token_tensor
        pad_id = int(pad.flatten()[0]) if pad is not None else 0
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        cache = _empty_cache(model, model_kwargs, batch)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        cost = self.costs.setdefault(batch, VerifyCost())
        kv = (AlignedKV if engine_rows(cache, mask) else RaggedKV)(model, cache, pad_id)
        self.record.verify_path = "aligned rows (engine cache)" if isinstance(kv, AlignedKV) else "ragged rows"
        call = _Call(kv, self.make_drafter(), processors, bool(cfg.do_sample), cost, stats)
        ctx = DraftContext(call.do_sample, batch, pad_id, call.warp, cost, max_new_tokens=int(cfg.max_length) - prompt_len,
                           target_kv=kv)
        call.drafter.start(model, ctx)
        self.record.draft_path = getattr(call.drafter, "path", None)
        stopper = Stopper(criteria, input_ids, prompt_len, int(cfg.max_length))
        has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
        rows = Rows(call.first_tokens(input_ids, mask), stopper, has_eos, int(cfg.max_length) - prompt_len)
        ctx.prefill_seconds = stats.prefill_seconds  # what a draft model's catch-up on the prompt is weighed against
        prompts = [input_ids[b][mask[b].bool()].tolist() for b in range(batch)]
        emitted = 0
        while True:
            live = rows.live()
            emitted = emit(streamer, rows.gen, live, emitted, pad_id, rows.final_len)
            if not any(live):
                break
            call.step(rows, prompts, live)
        self.record.tree_path = call.tree_path

        stats.tokens = sum(len(g) for g in rows.gen)
        out = rows.sequences(input_ids, pad_id)
        if streamer is not None:
            emit(streamer, rows.gen, [False] * batch, emitted, pad_id, out.shape[1] - prompt_len)
            streamer.end()
        return out


def _empty_cache(model: nn.Module, model_kwargs: dict, batch: int):
    """The caller's cache (it must be empty), or a growing cache (in-place appends, no ``torch.cat``
    of the cache per step)."""
    cache = cache_argument(model_kwargs)
    if cache is None:
        cache = GrowingCache(model.config)
    if batch > 1 and not capabilities(cache).ragged_rows:
        raise UnsupportedModelError(
            "speculative decoding with a KV-cache policy (PolicyCache) works at batch size 1 only: at batch > 1 "
            "rows keep different numbers of draft tokens, which leaves masked holes inside rows, and a "
            "policy's compact cache assumes each row's masked slots are its left padding (it evicts and "
            "aligns masks on that basis); generate one row at a time, or drop the cache policy"
        )
    if cache.get_seq_length() > 0:
        raise ConfigError(
            "speculative decoding starts from an empty cache; do not pass a filled past_key_values"
        )
    return cache


class _Call:
    """One ``generate`` call's decoding: the rows' KV (:class:`RaggedKV`), the drafter, the logits
    processors, and the statistics each step adds to."""

    def __init__(self, ragged: RaggedKV, drafter: Drafter, processors, do_sample: bool, cost: VerifyCost,
                 stats: SpeculativeStats):
        self.ragged = ragged
        self.drafter = drafter
        self.processors = processors
        self.history_free = _history_free(processors)
        self.do_sample = do_sample
        self.cost = cost
        self.stats = stats
        self.reader = window_reader(drafter)  # a drafter that learns from every slot's argmax, or None
        self.tree_path: str | None = None  # set when the drafter gives token trees (the stats record's)

    def warp(self, logits: Tensor) -> Tensor:
        """The processors a draft model's own distribution goes through (given to the drafter)."""
        if not self.processors or not self.history_free:
            return _apply_history_free(self.processors, logits)
        dummy = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)
        return self.processors(dummy, logits)

    def pick(self, scores: Tensor) -> Tensor:
        """The next token from processed scores: sampled or greedy."""
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        return scores.argmax(-1)

    def first_tokens(self, input_ids: Tensor, mask: Tensor) -> list[int]:
        """Prefill the prompt and pick the first token, exactly as ``generate``."""
        t0 = time.perf_counter()
        logits = self.ragged.prefill(input_ids, mask)[:, -1].to(torch.float32)
        first = self.pick(self.processors(input_ids, logits))
        self.stats.prefill_seconds += time.perf_counter() - t0
        return first.tolist()

    def step(self, rows: Rows, prompts: list[list[int]], live: list[bool]) -> None:
        """One round: the drafter proposes per row, one forward scores [last token, drafts] of every
        live row, the verifier accepts per row, the cache keeps what was accepted."""
        batch = len(live)
        active = [b for b in range(batch) if live[b]]
        limits = rows.limits(live)
        t0 = time.perf_counter()
        draft = self.drafter.propose([prompts[b] + rows.gen[b] for b in range(batch)], limits)
        drafts = [list(draft.tokens[b][: limits[b]]) if live[b] else [] for b in range(batch)]
        t1 = time.perf_counter()
        self.stats.draft_seconds += t1 - t0
        if draft.trees is not None and any(draft.trees):
            why = tree_problem(self.ragged)
            self.tree_path = f"first branch only: {why}" if why else "token trees"
            if why is None:
                tree_step(self, rows, draft.trees, live, limits, t1)  # several branches in one forward
                return

        self.ragged.retire([b for b in range(batch) if not live[b]])  # finished rows leave the forward
        feed = [[rows.gen[b][-1]] + drafts[b] if live[b] else [] for b in range(batch)]
        logits = self.ragged.extend(feed).to(torch.float32)  # [B, W, V]
        scores = self.process(logits, rows, drafts, active)
        accepted, nxt = self.verify(scores, drafts, draft.probs)
        if self.reader is not None:
            self.reader.observe_window(feed, scores.argmax(-1).tolist(), None)
        acc = accepted.tolist()
        self.ragged.keep_fed([acc[b] + 1 if live[b] else 0 for b in range(batch)])
        spent = time.perf_counter() - t1
        self.stats.verify_seconds += spent
        self.cost.observe(logits.shape[1], spent)

        nx = nxt.tolist()
        self.stats.steps += 1
        self.stats.row_steps += len(active)
        self.stats.drafted += sum(len(drafts[b]) for b in active)
        self.stats.accepted += sum(acc[b] for b in active)
        self.drafter.observe([len(d) for d in drafts], [acc[b] if live[b] else 0 for b in range(batch)])
        for b in active:
            rows.extend(b, drafts[b][: acc[b]] + [nx[b]])

    def verify(self, scores: Tensor, drafts: list[list[int]], draft_probs) -> tuple[Tensor, Tensor]:
        """(accepted draft tokens per row, the next token per row) by the exact rule."""
        batch, width, vocab = scores.shape
        if width == 1:  # nothing drafted: a plain decoding step
            return torch.zeros(batch, dtype=torch.long), self.pick(scores[:, 0])
        device = scores.device
        lengths = torch.tensor([len(d) for d in drafts], dtype=torch.long, device=device)
        dtok = torch.tensor([d + [0] * (width - 1 - len(d)) for d in drafts], dtype=torch.long, device=device)
        if self.do_sample:
            qprobs = _stack_draft_probs(draft_probs, drafts, width - 1, vocab, device)
            return verify_sampling(torch.softmax(scores, -1), dtok, lengths, qprobs)
        return verify_greedy(scores, dtok, lengths)

    def process(self, logits: Tensor, rows: Rows, drafts: list[list[int]], active: list[int]) -> Tensor:
        """Apply the logits processors at every position, each with the history it would see."""
        processors = self.processors
        if not processors:
            return logits
        batch, width, vocab = logits.shape
        if self.history_free:
            flat = logits.reshape(batch * width, vocab)
            dummy = torch.zeros((flat.shape[0], 1), dtype=torch.long, device=flat.device)
            return processors(dummy, flat).reshape(batch, width, vocab)
        out = logits.clone()
        for b in active:
            row_processors = _row_view(processors, b, batch)
            base = rows.stopper.row_ids(b, rows.gen[b])
            for j in range(len(drafts[b]) + 1):
                seq = torch.cat([base, base.new_tensor(drafts[b][:j])]) if j else base
                out[b, j] = row_processors(seq[None], logits[b, j][None])[0]
        return out


def _row_view(processors, b: int, batch: int):
    """Processors for row b alone: per-row state (a tensor attribute with the batch as first
    dimension, such as RepetitionPenalty's ``prompt_ignore_length``) is sliced to that row."""
    if batch == 1:
        return processors
    views = []
    for p in processors:
        sliced = {
            k: v[b : b + 1]
            for k, v in vars(p).items()
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch
        }
        if sliced:
            p = copy.copy(p)
            for k, v in sliced.items():
                setattr(p, k, v)
        views.append(p)
    return type(processors)(views)


def _apply_history_free(processors, logits: Tensor) -> Tensor:
    """Only the history-free processors (for a draft model's own distribution)."""
    dummy = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)
    for p in processors or []:
        if isinstance(p, HISTORY_FREE):
            logits = p(dummy, logits)
    return logits


def _stack_draft_probs(probs, drafts, width, vocab, device) -> Tensor | None:
    if probs is None:
        return None
    out = torch.zeros((len(drafts), width, vocab), dtype=torch.float32, device=device)
    for b, d in enumerate(drafts):
        if d:
            out[b, : len(d)] = probs[b][: len(d)].to(device=device, dtype=torch.float32)
    return out
