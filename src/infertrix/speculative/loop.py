"""The speculative decoding loop, plugged into ``generate`` as its ``custom_generate`` callable.

transformers 5 lets ``generate(custom_generate=callable)`` run a caller's decoding loop after it
has prepared everything else: the callable receives the model, the prompt ids, the *prepared*
logits processors and stopping criteria (temperature, top-k/top-p, eos, max length, stop
strings...), the generation config and the model kwargs (attention mask, cache). This loop
replaces only the token-by-token part:

  prefill -> first token (exactly as ``generate``) -> repeat: drafter proposes per row ->
  one forward of [last token, drafts] per row -> logits processors per position ->
  :mod:`.verify` accepts per row -> cache rollback (:mod:`.ragged`) -> stopping criteria per
  emitted token -> streamer.

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
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ..core.generation import cache_argument
from ..core.transform import ConfigError, UnsupportedModelError
from ..kvcache.cache import GrowingCache, capabilities
from .budget import VerifyCost
from .drafter import DraftContext, Drafter
from .ragged import RaggedKV
from .stats import SpeculativeStats, StatsRecord
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
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        do_sample = bool(cfg.do_sample)
        pad = cfg._pad_token_tensor
        pad_id = int(pad.flatten()[0]) if pad is not None else 0
        max_len = int(cfg.max_length)
        has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        cache = cache_argument(model_kwargs)
        if cache is None:
            cache = GrowingCache(model.config)  # in-place appends: no torch.cat of the cache per step
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
        if streamer is not None:
            streamer.put(input_ids.cpu())

        ragged = RaggedKV(model, cache, pad_id)
        prompts = [input_ids[b][mask[b].bool()].tolist() for b in range(batch)]
        stopper = _Stopper(criteria, input_ids, prompt_len, max_len)
        history_free = _history_free(processors)

        def warp(logits: Tensor) -> Tensor:
            if not processors or not history_free:
                return _apply_history_free(processors, logits)
            return processors(torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device), logits)

        cost = self.costs.setdefault(batch, VerifyCost())
        drafter = self.make_drafter()
        drafter.start(model, DraftContext(do_sample, batch, pad_id, warp, cost))

        t0 = time.perf_counter()
        logits = ragged.prefill(input_ids, mask)[:, -1].to(torch.float32)
        scores = processors(input_ids, logits)
        if do_sample:
            first = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(1)
        else:
            first = scores.argmax(-1)
        stats.prefill_seconds += time.perf_counter() - t0

        gen: list[list[int]] = [[int(t)] for t in first.tolist()]
        stop_len: list[int | None] = [None] * batch
        for b in range(batch):
            hit = stopper.first_stop(b, [], gen[b])
            if hit is not None:
                stop_len[b] = hit + 1
        final_len: int | None = None  # known once every row has stopped
        emitted = 0

        def target_len() -> int | None:
            if all(s is not None for s in stop_len):
                return max(stop_len)
            return None

        def active(b: int, target: int | None) -> bool:
            if has_eos:
                return stop_len[b] is None
            return target is None or len(gen[b]) < target

        while True:
            if has_eos:
                for b in range(batch):
                    if stop_len[b] is not None:
                        del gen[b][stop_len[b]:]
            else:
                final_len = target_len()
                if final_len is not None:
                    for b in range(batch):
                        del gen[b][final_len:]
            target = None if has_eos else final_len
            live = [active(b, target) for b in range(batch)]
            emitted = _emit(streamer, gen, live, emitted, pad_id, final_len)
            rows = [b for b in range(batch) if live[b]]
            if not rows:
                break
            cap = final_len if final_len is not None else max_len - prompt_len
            limits = [max(0, cap - len(gen[b]) - 1) if live[b] else 0 for b in range(batch)]

            t0 = time.perf_counter()
            draft = drafter.propose([prompts[b] + gen[b] for b in range(batch)], limits)
            drafts = [list(draft.tokens[b][: limits[b]]) if live[b] else [] for b in range(batch)]
            t1 = time.perf_counter()
            stats.draft_seconds += t1 - t0

            ragged.retire([b for b in range(batch) if not live[b]])  # finished rows leave the forward
            feed = [[gen[b][-1]] + drafts[b] if live[b] else [] for b in range(batch)]
            logits = ragged.extend(feed).to(torch.float32)  # [B, W, V]
            width = logits.shape[1]
            scores = self._process(processors, history_free, logits, stopper, gen, drafts, rows)
            if width == 1:  # nothing drafted: a plain decoding step
                last = scores[:, 0]
                nxt = torch.multinomial(torch.softmax(last, -1), 1).squeeze(1) if do_sample else last.argmax(-1)
                accepted = torch.zeros(batch, dtype=torch.long)
            else:
                lengths = torch.tensor([len(d) for d in drafts], dtype=torch.long, device=device)
                dtok = torch.tensor(
                    [d + [0] * (width - 1 - len(d)) for d in drafts], dtype=torch.long, device=device
                )
                if do_sample:
                    probs = torch.softmax(scores, -1)
                    qprobs = _stack_draft_probs(draft.probs, drafts, width - 1, probs.shape[-1], device)
                    accepted, nxt = verify_sampling(probs, dtok, lengths, qprobs)
                else:
                    accepted, nxt = verify_greedy(scores, dtok, lengths)
            acc = accepted.tolist()
            ragged.keep_fed([acc[b] + 1 if live[b] else 0 for b in range(batch)])
            spent = time.perf_counter() - t1
            stats.verify_seconds += spent
            cost.observe(width, spent)

            nx = nxt.tolist()
            stats.steps += 1
            stats.row_steps += len(rows)
            stats.drafted += sum(len(drafts[b]) for b in rows)
            stats.accepted += sum(acc[b] for b in rows)
            drafter.observe([len(d) for d in drafts], [acc[b] if live[b] else 0 for b in range(batch)])
            for b in rows:
                new = drafts[b][: acc[b]] + [nx[b]]
                if stop_len[b] is None:
                    hit = stopper.first_stop(b, gen[b], new)
                    if hit is not None:
                        stop_len[b] = len(gen[b]) + hit + 1
                gen[b].extend(new)

        stats.tokens = sum(len(g) for g in gen)
        total = max(len(g) for g in gen)
        out = torch.full((batch, total), pad_id, dtype=input_ids.dtype, device=device)
        for b in range(batch):
            out[b, : len(gen[b])] = torch.tensor(gen[b], dtype=input_ids.dtype)
        if streamer is not None:
            _emit(streamer, gen, [False] * batch, emitted, pad_id, total)
            streamer.end()
        return torch.cat([input_ids, out], dim=1)

    @staticmethod
    def _process(processors, history_free, logits, stopper, gen, drafts, rows) -> Tensor:
        """Apply the logits processors at every position, each with the history it would see."""
        if not processors:
            return logits
        batch, width, vocab = logits.shape
        if history_free:
            flat = logits.reshape(batch * width, vocab)
            dummy = torch.zeros((flat.shape[0], 1), dtype=torch.long, device=flat.device)
            return processors(dummy, flat).reshape(batch, width, vocab)
        out = logits.clone()
        for b in rows:
            row_processors = _row_view(processors, b, batch)
            base = stopper.row_ids(b, gen[b])
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


def _emit(streamer, gen, active, emitted, pad_id, final_len) -> int:
    """Send the columns every row has reached to the streamer, one ``[batch]`` tensor each."""
    if streamer is None:
        return emitted
    lens = [len(g) for g, a in zip(gen, active, strict=True) if a]
    ready = min(lens) if lens else max(len(g) for g in gen)
    if final_len is not None:
        ready = min(ready, final_len)
    for c in range(emitted, ready):
        streamer.put(torch.tensor([g[c] if c < len(g) else pad_id for g in gen], dtype=torch.long))
    return max(emitted, ready)


class _Stopper:
    """Stopping criteria evaluated per row and per emitted token, with the history ``generate``
    would pass (the left-padded prompt row followed by the row's tokens)."""

    def __init__(self, criteria, input_ids: Tensor, prompt_len: int, max_len: int):
        self.criteria = criteria
        self.input_ids = input_ids
        self.prompt_len = prompt_len
        self.max_len = max_len
        self.fast = all(isinstance(c, MaxLengthCriteria | EosTokenCriteria) for c in criteria)
        eos = set()
        for c in criteria:
            if isinstance(c, EosTokenCriteria):
                eos.update(int(t) for t in c.eos_token_id.flatten().tolist())
            if isinstance(c, MaxLengthCriteria):
                self.max_len = min(self.max_len, int(c.max_length))
        self.eos = eos

    def row_ids(self, b: int, tokens: list[int]) -> Tensor:
        row = self.input_ids[b]
        return torch.cat([row, row.new_tensor(tokens)]) if tokens else row

    def first_stop(self, b: int, before: list[int], new: list[int]) -> int | None:
        """Index in ``new`` of the first token after which row b stops, or None."""
        if self.fast:
            for i, t in enumerate(new):
                if t in self.eos or self.prompt_len + len(before) + i + 1 >= self.max_len:
                    return i
            return None
        for i in range(len(new)):
            seq = self.row_ids(b, before + new[: i + 1])
            if bool(self.criteria(seq[None], None)[0]):
                return i
        return None
