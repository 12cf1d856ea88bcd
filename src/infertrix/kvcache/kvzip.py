"""KVzip: keep the KV pairs the model reads back when it is asked to repeat the context.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416 (code: https://github.com/snu-mllab/KVzip).

After the prompt's forward, the model is asked to reconstruct it: the repeat prompt ("Repeat the
previous context exactly.") and then the prompt's own tokens are fed, teacher-forced, through the
model on the full cache, ``chunk_size`` prompt tokens at a time (a later chunk's prompt quotes the last
8 tokens of the chunk before, as in the paper). Each stored token of a chunk scores the largest
attention probability any query of that input pays it, over the queries of its KV head's group; the
softmax runs over the chunk's keys, the attention sinks' and the input's own (the paper's chunked
scoring, which bounds it at ``chunk x (chunk + input)`` per head). What the model reads to reproduce
the context is what any later question can need, so the scores are the same whatever the question.

How it runs here: the second forward needs every layer's full cache, so no layer can be compressed as
the prefill goes. Each layer's compression is left pending after its attention (``compress_layer``),
and ``after_forward``, the policy hook run once the model's whole forward is done (the model's forward
hook; :func:`~.replay.replay` calls it too), runs the decoder over the reconstruction inputs on the same
cache, scores each layer from its attention module's input (a forward hook per module, for that
forward only), crops the reconstruction's tokens off again (sliding-window layers are restored from a
copy taken before), then compresses every layer to its budget. Only the current forward's tokens are
reconstructed; tokens stored by earlier forwards keep the scores they had, and tokens decoded since
are kept, like another method's recent window. With ``decode_interval``, the ids of every forward that
does not compress are kept on the cache (``UNREAD``) and re-read with the next compression's: every
``decode_interval`` decoded tokens are reconstructed as a chunk of their own (the paper's chunked
reconstruction applied to generated text), so a long generation stays within the budget.
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Applied, ConfigError, UnsupportedModelError, register_transform
from ..core.calibration import find_tokenizer
from ..core.generation import cache_argument_name
from ..core.model import decoder_layers
from .attach import check_supported_model
from .attention import compute_queries
from .context import FORCE_KEEP, ScoreContext, over_budget
from .policy import KVPolicy

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"
# a later chunk's prompt: these two around the last OVERLAP_TOKENS tokens of the chunk before
CONTINUE_PROMPT = ("\n\nRepeat the part of the previous context exactly, starting with ", ":\n")
OVERLAP_TOKENS = 8
QUERY_BLOCK = 256  # reconstruction queries scored at once (bounds the [G x block x keys] probabilities)
UNREAD = "kvzip_unread"  # a cache's attribute: ids [B, n] fed since its last compression (decode_interval)

# per model: (the repeat prompts' ids, or None, and where they came from), found once
_PROMPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reconstruction_scores(queries: Tensor, keys: Tensor, skip: int, context: int, scaling: float) -> Tensor:
    """[H_kv, context]: the largest softmax probability any of the ``L`` reconstruction queries
    ``queries`` [H_q, L, D] pays each of the ``context`` chunk keys, over each KV head's query group.
    ``keys`` [H_kv, skip + context + L, D] are the ``skip`` sinks', the chunk's, then the input's own
    (causal: query ``i`` sees the input's keys up to its own)."""
    hq, n, d = queries.shape
    hkv, total, _ = keys.shape
    g, past = hq // hkv, total - n
    k = keys.float()
    best = torch.zeros(hkv, context, device=keys.device)
    for start in range(0, n, QUERY_BLOCK):
        w = min(QUERY_BLOCK, n - start)
        end = past + start + w  # the input's keys after the block's last query are masked for all of it
        q = (queries[:, start : start + w].float() * scaling).reshape(hkv, g * w, d)  # head h*G + j: KV head h
        logits = torch.matmul(q, k[:, :end].transpose(-1, -2)).view(hkv, g, w, end)
        logits[..., end - w :].masked_fill_(torch.ones(w, w, dtype=torch.bool, device=keys.device).triu_(1),
                                            float("-inf"))  # causal within the block
        probs = torch.softmax(logits, dim=-1)[..., skip : skip + context]
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


def _unread(cache, ids: Tensor | None) -> Tensor | None:
    """The ids [B, n] fed to ``cache`` since its last compression and not re-read yet, then ``ids``: a
    batch of another size (rows retired or reordered) drops the earlier ones (kept unscored, as decoded
    tokens are without ``decode_interval``)."""
    earlier = getattr(cache, UNREAD, None)
    if ids is None or earlier is None or earlier.shape[0] != ids.shape[0]:
        return ids
    return torch.cat([earlier, ids], dim=1)


def repeat_prompts(model: nn.Module, tokenizer: Any = None) -> tuple[tuple[Tensor, ...] | None, str]:
    """((the repeat prompt's ids, the two parts of a later chunk's prompt), where they came from), from
    ``tokenizer`` or else the model's own (looked up once per model); (None, why) without one."""
    if tokenizer is not None:
        return _tokenized(model, tokenizer), "repeat prompt from the tokenizer passed"
    if model not in _PROMPTS:
        tok, where = find_tokenizer(model)
        _PROMPTS[model] = (
            (None, f"no tokenizer ({where}): the prompt alone is re-read, without the repeat prompt; pass "
                   "KVzip(tokenizer=tok)") if tok is None
            else (_tokenized(model, tok), f"repeat prompt from the model's tokenizer ({where})")
        )
    return _PROMPTS[model]


def _tokenized(model: nn.Module, tokenizer: Any) -> tuple[Tensor, ...]:
    ids = tuple(torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
                for t in (REPEAT_PROMPT, *CONTINUE_PROMPT))
    vocab = model.get_input_embeddings().num_embeddings
    if any(bool((t >= vocab).any()) for t in ids):
        raise ConfigError(f"KVzip's repeat prompt tokenizes to ids beyond the model's {vocab} embeddings; pass the "
                          "model's own tokenizer as KVzip(tokenizer=tok)")
    return ids


@dataclass
class _Pending:
    """A layer's compression waiting for the reconstruction (its ``LayerState.pending``)."""

    visible: Tensor | None  # [B, S] False for pads, as at the prefill
    reading: bool = False  # the reconstruction's own forward is running


class _Reconstruction:
    """The reconstruction of one forward's tokens (``ids`` [B, n]) on ``cache``: each chunk's inputs,
    the decoder forward over them, and the scores [B, H_kv, n] of every pending layer."""

    def __init__(self, policy: KVzip, model: nn.Module, cache, ids: Tensor, mask, positions, ranks: list[int]):
        self.policy, self.model, self.cache, self.ranks = policy, model, cache, ranks
        self.prompts = repeat_prompts(model, policy.tokenizer)[0]
        b, self.n = ids.shape
        seen = cache.evicting_layers[ranks[0]].cumulative_length
        history = torch.ones(b, seen, dtype=torch.long, device=ids.device)
        if mask is not None:
            history[:, seen - min(seen, mask.shape[1]) :] = mask[:, -seen:]
        self.history = history  # the 2D mask of every token seen
        fed = history[:, -self.n :].bool()
        self.rows = [ids[r][fed[r]] for r in range(b)]  # each row's tokens of this forward (left padding)
        if positions is not None:
            self.next = (positions[:, -1] + 1).expand(b)
        else:  # the model counted positions from the cache length
            self.next = torch.full((b,), seen, dtype=torch.long, device=ids.device)
        self.scores = {r: torch.zeros(b, cache.evicting_layers[r].keys.shape[1], self.n, device=ids.device)
                       for r in ranks}
        self.lengths: list[int] = []

    def chunk_inputs(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [B, W], the 2D mask of history + input, positions [B, W]) of chunk ``k``'s inputs,
        left-padded; a row with no chunk ``k`` gets an empty input."""
        m = self.policy.chunk_size
        inputs = []
        for toks in self.rows:
            chunk = toks[k * m : (k + 1) * m]
            if len(chunk) == 0:
                inputs.append(chunk)
                continue
            parts = [] if self.prompts is None else [self.prompts[0].to(toks.device)]
            if k:  # the paper's prompt for a later chunk quotes the end of the one before
                tail = toks[max(0, k * m - OVERLAP_TOKENS) : k * m]
                parts = [tail] if self.prompts is None else [self.prompts[1].to(tail.device), tail,
                                                             self.prompts[2].to(tail.device)]
            inputs.append(torch.cat([*parts, chunk]))
        self.lengths = [len(t) for t in inputs]
        width = max(self.lengths)
        b = len(inputs)
        ids = torch.zeros(b, width, dtype=torch.long, device=self.history.device)
        new = torch.zeros_like(ids)
        for r, t in enumerate(inputs):
            ids[r, width - len(t) :] = t
            new[r, width - len(t) :] = 1
        positions = self.next[:, None] + (new.cumsum(-1) - 1).clamp_min(0)
        return ids, torch.cat([self.history, new], 1), positions

    def score_layer(self, rank: int, k: int, module, args, kwargs, output) -> None:
        """Forward hook of layer ``rank``'s attention during chunk ``k``: score the chunk's tokens."""
        layer, pending = self.cache.evicting_layers[rank], self.cache.states[rank].pending
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        queries = compute_queries(module, hidden, kwargs["position_embeddings"])  # [B, H_q, W, D]
        keys, _ = layer.full_keys_values()  # the stored tokens, then the input's
        w = hidden.shape[1]
        s, m, sinks = keys.shape[2] - w, self.policy.chunk_size, self.policy.sink_tokens
        for r, toks in enumerate(self.rows):
            c = len(toks[k * m : (k + 1) * m])
            if c == 0:
                continue
            first = s - len(toks) + k * m  # the chunk's first slot
            p0 = int((~pending.visible[r]).sum()) if pending.visible is not None else 0  # the row's kept pads
            end = max(p0, min(p0 + sinks, first))  # sinks not in the chunk itself
            n_in = self.lengths[r]
            sub = torch.cat([keys[r, :, p0:end], keys[r, :, first : first + c], keys[r, :, s + w - n_in :]], dim=1)
            got = reconstruction_scores(queries[r, :, w - n_in :], sub, end - p0, c, float(module.scaling))
            local = self.n - len(toks) + k * m
            self.scores[rank][r, :, local : local + c] = got

    def run(self) -> dict[int, Tensor]:
        cache, decoder = self.cache, self.model.get_decoder()
        attn = [layer.self_attn for layer in decoder_layers(self.model)]
        chunks = max((len(t) + self.policy.chunk_size - 1) // self.policy.chunk_size for t in self.rows)
        for k in range(chunks):
            ids, mask, positions = self.chunk_inputs(k)
            others = {i: copy.deepcopy(layer) for i, layer in enumerate(cache.layers) if i not in cache.rank}
            seen = {i: cache.layers[i].cumulative_length for i in cache.evicting_indices}
            handles = [attn[cache.evicting_indices[r]].register_forward_hook(
                functools.partial(self.score_layer, r, k), with_kwargs=True) for r in self.ranks]
            for r in self.ranks:
                cache.states[r].pending.reading = True
            try:
                decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_argument_name(decoder): cache})
            finally:  # the reconstruction leaves the cache as the prefill left it
                for h in handles:
                    h.remove()
                for r in self.ranks:
                    cache.states[r].pending.reading = False
                for i, length in seen.items():
                    cache.layers[i].crop(length)
                for i, layer in others.items():
                    cache.layers[i] = layer
        return self.scores


@register_transform("kvzip")
@dataclass
class KVzip(KVPolicy):
    """Scores every stored token by the attention it gets while the model reconstructs the prompt
    (repeat prompt + the prompt, teacher-forced, in chunks), then keeps the best ``budget`` per KV
    head, with the first ``sink_tokens``. Query-agnostic: the kept cache serves any later question.
    Costs a second forward over every prompt it compresses (about twice the prefill's compute,
    prompt plus repeat prompt, plus the scores' ``chunk x (chunk + input)`` attention per head), and the
    prefill's peak memory is the full cache's (every layer is compressed after the reconstruction).
    Lossy. Without ``decode_interval`` decoded tokens are kept (no prompt to re-read); with it, every
    ``decode_interval`` tokens fed since the last compression (decoded ones, short prompt chunks) are
    re-read the same way, after the repeat prompt, and the cache is compressed back to the budget.
    Batches: each row reconstructs its own tokens in its own chunks, so a padded row scores as alone.

    - ``chunk_size``: prompt tokens reconstructed per forward (the paper: 2K).
    - ``sink_tokens``: first tokens always kept, and in every chunk's softmax (kvpress: 4).
    - ``tokenizer``: writes the repeat prompt (default: the model's own, see
      ``infertrix.core.calibration.find_tokenizer``); without one the prompt alone is teacher-forced
      after itself, and ``describe()`` says so.
    """
    use_when = ("a context compressed once and asked many questions (query-agnostic); costs a second "
                "forward over each prompt it compresses")

    chunk_size: int = 2048
    sink_tokens: int = 4
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"KVzip.chunk_size must be a positive token count (the paper: 2048), got {self.chunk_size!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ConfigError(f"KVzip.sink_tokens must be an int >= 0, got {self.sink_tokens!r}")

    def fixed_part(self) -> tuple[int, str, str]:
        return self.sink_tokens, f"the attention sinks, sink_tokens={self.sink_tokens}", "fewer sink_tokens"

    def check_model(self, model: nn.Module) -> None:
        check_supported_model(model, self, needs_queries=True)
        if not callable(getattr(model, "get_decoder", None)):
            raise UnsupportedModelError("KVzip runs the model's decoder over the reconstruction and needs "
                                        f"{type(model).__name__}.get_decoder()")

    def apply(self, model: nn.Module) -> Applied:
        applied = super().apply(model)
        report = applied.report
        where = repeat_prompts(model, self.tokenizer)[1]
        decoded = (f"every {self.decode_interval} decoded tokens re-read the same way" if self.decode_interval
                   else "decoded tokens kept")
        applied.report = lambda: {**report(), "reconstruction": (
            f"a second forward over each compressed prompt, {self.chunk_size} tokens a chunk; {decoded}; {where}")}
        return applied

    def score(self, ctx: ScoreContext) -> Tensor:
        raise NotImplementedError("KVzip scores in after_forward, from a second forward (see kvzip.py)")

    # -- the policy hooks -----------------------------------------------------------------------------
    def after_attention(self, module, cache, rank: int, hidden: Tensor, position_embeddings, mask) -> None:
        pending = cache.states[rank].pending
        if isinstance(pending, _Pending):
            if pending.reading:
                return  # the reconstruction's own forward: scored by its hooks
            raise ConfigError(
                "KVzip compresses once the model's whole forward is done (its forward hook re-reads the prompt), "
                "and the last forward on this cache ended without it: call the causal LM (model(...) or "
                "generate), not its decoder, and start from a fresh cache (infertrix.kvcache.new_cache)"
            )
        super().after_attention(module, cache, rank, hidden, position_embeddings, mask)

    def compress_layer(self, ctx: ScoreContext) -> None:
        ctx.state.pending = _Pending(ctx.visible)  # scored and compressed in after_forward

    def after_forward(self, model, cache, input_ids, attention_mask, position_ids) -> bool:
        ranks = [r for r, st in enumerate(cache.states) if isinstance(st.pending, _Pending)]
        ids_given = isinstance(input_ids, Tensor) and not input_ids.is_floating_point()
        unread = _unread(cache, input_ids if ids_given else None)  # tokens since the last compression, then these
        if not ranks:
            if self.decode_interval and ids_given:  # re-read at the next compression (decode_interval)
                setattr(cache, UNREAD, unread)
            return False
        try:
            if not ids_given:
                raise ConfigError("KVzip re-reads the prompt from its token ids; call the model with input_ids, "
                                  "not inputs_embeds")
            with torch.no_grad():
                scores = _Reconstruction(self, model, cache, unread, attention_mask, position_ids, ranks).run()
                self.compress_scored(cache, {r: self.keep_scores(cache, r, scores[r]) for r in ranks})
        finally:
            for r in ranks:
                cache.states[r].pending = None
            if hasattr(cache, UNREAD):
                delattr(cache, UNREAD)
        return True

    def keep_scores(self, cache, rank: int, new: Tensor) -> Tensor:
        """[B, H_kv, S] scores of layer ``rank``'s stored tokens: the reconstruction's for this forward's
        ``new`` [B, H_kv, n] tokens, stored beside the earlier ones (``aux``, which follows evictions);
        decoded tokens and the sinks forced in."""
        layer, state = cache.evicting_layers[rank], cache.states[rank]
        visible = state.pending.visible
        s, n = layer.stored_length, new.shape[-1]
        score, scored = state.aux.get("kvzip"), state.aux.get("kvzip_scored")
        if score is None:
            score, scored = new.new_zeros(*new.shape[:2], s), new.new_zeros(*new.shape[:2], s)
        score[..., s - n :], scored[..., s - n :] = new, 1.0
        state.aux["kvzip"], state.aux["kvzip_scored"] = score, scored
        keep = torch.where(scored > 0, score, torch.full_like(score, FORCE_KEEP))  # decoded tokens: kept
        order = torch.arange(1, s + 1, device=score.device)[None] if visible is None else visible.cumsum(-1)
        sinks = order <= self.sink_tokens if visible is None else visible & (order <= self.sink_tokens)
        return keep + FORCE_KEEP * sinks[:, None, :]

    def compress_scored(self, cache, keeps: dict[int, Tensor]) -> None:
        """Keep each scored layer's budget of its ``keeps[rank]`` scores (the same count per KV head)."""
        for rank, keep in keeps.items():
            layer, state = cache.evicting_layers[rank], cache.states[rank]
            targets = self.row_targets(cache, rank)
            if over_budget(targets, layer.stored_length, state.pending.visible):
                self.evict(layer, state, keep, targets, state.pending.visible)
            self.finish(layer, state)

    @staticmethod
    def finish(layer, state) -> None:
        state.pending = None
        state.steps_since_compress = 0  # also when nothing was evicted: the next re-read is decode_interval away
        layer.flush()  # KIVI: quantize what is kept (held back while the compression was pending)
