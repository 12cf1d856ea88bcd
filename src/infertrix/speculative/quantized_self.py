"""Quantized self-speculation: the model under W8A8 (or W4A8) drafts for its own full-precision self.

QSpec (Zhao et al., "QSpec: Speculative Decoding with Complementary Quantization Schemes", 2024,
https://arxiv.org/abs/2410.11305) drafts with low-precision activations and weights and verifies
with higher precision, sharing one set of weights; "Quantize what counts" / quantized
self-speculative decoding (Tiwari et al., "QuantSpec", 2025, https://arxiv.org/abs/2502.10424)
does the same with a 4-bit copy of the weights and KV cache. Here the draft is a structural copy
of the target whose linear layers (and ``lm_head``) are swapped for the quant family's
:class:`~infertrix.quant.W8A8` layers (int8 per-channel weights, int8 per-token activations, no
smoothing; the default) or :class:`~infertrix.quant.W4A8Linear` (int4 weights in groups);
everything else (embedding, norms, rotary tables) is the *same* tensors as the target's, so the
extra memory is only the quantized weights (reported by ``describe``).
The draft drafts on the *model's* KV cache, as QSpec does (``shared_cache``, the default;
:func:`~.shared.share_cache`): it reads the keys and values the model wrote for the context
and its own draft tokens' entries are cut away before verification, so it has no prompt to catch
up on (its own cache made it run over the whole prompt before its first draft of every call: a
prefill no later step repaid when drafting did not win, 0.82x plain at batch 4). With
``shared_cache=false``, or on a cache it cannot share (a KV policy's), the draft keeps its own
KV cache. It drafts on the decode engine (:mod:`.lean`) when the model runs there.
Lossless: the full-precision model verifies every token.

Which precision: the draft pays only when it agrees with the target often. On SmolLM2-135M
(teacher-forced on the model's own greedy output, 4 prompts per kind, 96 tokens) the W8A8 draft
agrees with the target's greedy token 97% of the time on rewriting, 93% on story continuation
and 94% on questions; W4A8 (group 32, MSE clipping) 87%, 72% and 74%; W4A8 group 128 without
clipping 89%, 61% and 60%. Mixing (8-bit attention or MLP, 4-bit elsewhere) reached 75-84%. The
4-bit draft costs less per token (6.8 against 8.5-8.9 ms for the W8A8 draft on
``infertrix::w8a8_linear``, 1 thread; a float32 step is 36 ms) but is accepted far less on
open-ended text.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.registry import register_transform
from ..core.state import copy_without_state
from ..core.transform import ConfigError
from .budget import weight_bytes
from .draft_model import DraftModelDrafter
from .drafter import Drafter
from .state import prepared, prepared_for
from .transform import SpeculativeDecoding


def _fingerprint(t) -> tuple[float, float]:
    """Two sums that any in-place rescaling or rotation of a tensor changes (``.data`` writes do not
    bump its version counter)."""
    if not t.is_floating_point():
        return (float(t.sum()), 0.0)
    t = t.detach()  # sums accumulated in float64, without a float64 copy of the tensor
    return (float(t.sum(dtype=torch.float64)), float(t.abs().sum(dtype=torch.float64)))


def quantized_copy(model: nn.Module, quant) -> tuple[nn.Module, int]:
    """A copy of ``model`` sharing all its tensors, then ``quant`` applied to the copy only.
    Returns (copy, bytes of the copy's tensors that the target does not share)."""
    from .. import optimize

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    before = {i: (t.data_ptr(), t._version, _fingerprint(t)) for i, t in shared.items()}
    draft = copy_without_state(model, memo=shared)
    optimize(draft, quant, defaults=False)  # the draft runs on the target's engine runner, or its modules
    draft.eval()
    changed = [i for i, t in shared.items() if (t.data_ptr(), t._version, _fingerprint(t)) != before[i]]
    if changed:  # e.g. a rotation folded into the shared embedding: the target itself was changed
        raise RuntimeError(
            f"quantizing the draft copy with {type(quant).__name__} modified {len(changed)} of the model's own "
            "tensors, which the copy shares; use a quantization that only replaces layers (no rotation, no "
            "smoothing folded into the norms)"
        )
    own = {
        id(t): t.numel() * t.element_size()
        for t in itertools.chain(draft.parameters(), draft.buffers())
        if id(t) not in shared
    }
    return draft, sum(own.values())


@register_transform("quantized_self", "qspec")
@dataclass
class QuantizedSelf(SpeculativeDecoding):
    """Speculative decoding with the model's own W8A8 (or W4A8) copy as the draft (QSpec,
    https://arxiv.org/abs/2410.11305; QuantSpec, https://arxiv.org/abs/2502.10424). Lossless; costs
    the quantized weights (1/4 of float32 at 8 bits, about 1/7 at 4).

    Fields:
      weight_bits: 8 (W8A8 without smoothing, so nothing of the target changes: the default, a
        close draft) or 4 (W4A8: half the draft's cost per token, accepted less often).
      group_size: W4A8 weight group size (see :class:`~infertrix.quant.W4A8`).
      mse_clip: choose each group's clipping range by least squared error (W4A8's ``mse_clip``).
        Group 32 with ``mse_clip`` agrees with SmolLM2's greedy token 72-74% of the time on open-ended
        text, group 128 without it 60-61% (teacher-forced, 4 prompts each, 96 tokens).
      quantize_lm_head: quantize the output projection too (a separate copy; the tied embedding
        stays shared and float).
      shared_cache: draft on the model's own KV cache (QSpec): no draft cache and no catch-up over
        the prompt. False keeps a draft cache of the draft's own keys and values.
      num_tokens, adaptive, max_tokens, confidence: as in :class:`~.draft_model.DraftModel`, but
        ``confidence`` defaults to 0.1: a draft this close to the model is usually right even when
        unsure. On SmolLM2 (1 thread, one greedy call of up to 128 tokens, median of 3; measured when
        the draft still multiplied with ``torch._int_mm``, 13.5 ms per draft token) a story
        continuation took 2.42 s at 0.3, 1.95 s at 0.1 and 2.02 s at 0 (plain: 2.20 s), a
        question's answer 4.07, 3.70 and 4.14 s (plain: 5.11 s).
    """
    use_when = "no draft model: drafts with the model's own int8 copy; lossless, costs the copy's memory"

    primary: ClassVar[str | None] = "num_tokens"
    bench_recipe: ClassVar[str | None] = "quantized_self"
    weight_bits: int = 8
    group_size: int = 32
    mse_clip: bool = True
    quantize_lm_head: bool = True
    num_tokens: int = 4
    adaptive: bool = True
    max_tokens: int = 10
    confidence: float = 0.1
    shared_cache: bool = True

    def validate(self) -> None:
        from ..quant.int4 import check_group_size

        check_group_size(self.group_size)
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"QuantizedSelf.weight_bits must be 4 (W4A8) or 8 (W8A8), got {self.weight_bits}")
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"QuantizedSelf needs 1 <= num_tokens <= max_tokens, got {self.num_tokens}, {self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"QuantizedSelf confidence must be in [0, 1), got {self.confidence}")

    def draft_for(self, model: nn.Module) -> nn.Module:
        """The quantized copy of ``model`` (built once per model and kept in its run-time record)."""
        return self._draft(model)[0]

    def _draft(self, model: nn.Module) -> tuple[nn.Module, int]:
        return prepared_for(model, self, lambda: quantized_copy(model, self._quantizer()))

    def _quantizer(self):
        from ..quant import W4A8, W8A8

        if self.weight_bits == 8:
            return W8A8(smooth_alpha=None, quantize_lm_head=self.quantize_lm_head, progress=False,
                        keep_original=False)
        # rotate=False: rotation folds into the embedding and norms, which the copy shares
        return W4A8(group_size=self.group_size, mse_clip=self.mse_clip, rotate=False,
                    quantize_lm_head=self.quantize_lm_head, progress=False, keep_original=False)

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return ("its draft is a copy of the model, and transformers' tensor-parallel forwards stay bound to "
                "the original modules; use prompt lookup (pld) or a draft_model loaded in each process")

    def check_model(self, model: nn.Module) -> None:
        self.draft_for(model)  # fails here, before anything is applied, if the quantizer cannot

    def apply(self, model: nn.Module):
        applied = super().apply(model)
        why = self.cost_problem(model)
        if why:
            warnings.warn(f"infertrix: quantized_self: {why}", stacklevel=3)
        return applied

    def cost_problem(self, model: nn.Module) -> str | None:
        """Why drafting cannot pay on ``model``: its layers are already quantized to no more bytes
        than the draft's (a W4A8 or W8A8 target), so a draft token costs about as much as a step."""
        kept = prepared(model, self)
        if not kept:
            return None
        target = weight_bytes(model)
        if kept[1] < 0.6 * target:
            return None
        return (f"its {self.weight_bits}-bit draft reads {kept[1] / 2**20:.1f} MiB of weights per token, against "
                f"{target / 2**20:.1f} MiB for the model's own layers (already quantized): a draft token costs about "
                "as much as a step, so drafting cannot pay and the never-slower guard keeps to plain steps after "
                "probing; use prompt lookup (pld) or lookahead on a quantized model")

    def drafter_report(self, model: nn.Module) -> dict[str, Any]:
        why = self.cost_problem(model)
        return {**({"warning": why} if why else {}),
            "draft": (f"this model under W4A8 (group {self.group_size}{', mse clip' if self.mse_clip else ''}, "
                      if self.weight_bits == 4 else "this model under W8A8 (") + "lm_head "
            f"{'quantized' if self.quantize_lm_head else 'float'}), embeddings and norms shared",
            "draft_bytes": kept[1] if (kept := prepared(model, self)) else None,  # its own tensors: the extra memory
        }

    def held_tensors(self, model: nn.Module) -> list[Tensor]:
        kept = prepared(model, self)
        return list(itertools.chain(kept[0].parameters(), kept[0].buffers())) if kept else []

    def make_drafter(self, model: nn.Module) -> Drafter:
        return DraftModelDrafter(
            self.draft_for(model), self.num_tokens, self.confidence, self.adaptive, self.max_tokens,
            share=self.shared_cache,
        )
