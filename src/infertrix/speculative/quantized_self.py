"""Quantized self-speculation: the model under W4A8 drafts for its own full-precision self.

QSpec (Zhao et al., "QSpec: Speculative Decoding with Complementary Quantization Schemes", 2024,
https://arxiv.org/abs/2410.11305) drafts with low-precision activations and weights and verifies
with higher precision, sharing one set of weights; "Quantize what counts" / quantized
self-speculative decoding (Tiwari et al., "QuantSpec", 2025, https://arxiv.org/abs/2502.10424)
does the same with a 4-bit copy of the weights and KV cache. Here the draft is a structural copy
of the target whose linear layers (and ``lm_head``) are swapped for
:class:`~infertrix.quant.W4A8Linear` (round-to-nearest int4 weights, int8 per-token activations,
the quant family's ``infertrix::w4a8_linear`` kernel); everything else (embedding, norms, rotary
tables) is the *same* tensors as the target's, so the extra memory is only the 4-bit weights
(reported by ``describe``) plus the draft's KV cache. The draft keeps its own KV cache
(:class:`~.draft_model.DraftModelDrafter`), since its keys and values differ from the target's.
Lossless: the full-precision model verifies every token.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .draft_model import DraftModelDrafter
from .drafter import Drafter
from .transform import SpeculativeDecoding

# what an infertrix model carries in its __dict__ that a draft copy must not inherit
_INSTANCE_STATE = ("_infertrix", "generate", "speculative_stats")


def quantized_copy(model: nn.Module, quant) -> tuple[nn.Module, int]:
    """A copy of ``model`` sharing all its tensors, then ``quant`` applied to the copy only.
    Returns (copy, bytes of the copy's tensors that the target does not share)."""
    from .. import optimize

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    draft = copy.deepcopy(model, memo=dict(shared))
    for key in _INSTANCE_STATE:
        draft.__dict__.pop(key, None)
    optimize(draft, quant)
    draft.eval()
    own = {
        id(t): t.numel() * t.element_size()
        for t in itertools.chain(draft.parameters(), draft.buffers())
        if id(t) not in shared
    }
    return draft, sum(own.values())


@register_transform("quantized_self", "qspec")
@dataclass
class QuantizedSelf(SpeculativeDecoding):
    """Speculative decoding with the model's own W4A8 copy as the draft (QSpec,
    https://arxiv.org/abs/2410.11305; QuantSpec, https://arxiv.org/abs/2502.10424). Lossless; costs
    the 4-bit weights (about 1/7 of float32) and a draft KV cache.

    Fields:
      group_size: W4A8 weight group size (see :class:`~infertrix.quant.W4A8`).
      quantize_lm_head: quantize the output projection too (a separate 4-bit copy; the tied
        embedding stays shared and float).
      num_tokens, adaptive, max_tokens, confidence: as in :class:`~.draft_model.DraftModel`.
    """

    primary: ClassVar[str | None] = "num_tokens"
    bench_recipe: ClassVar[str | None] = "quantized_self"
    group_size: int = 128
    quantize_lm_head: bool = True
    num_tokens: int = 4
    adaptive: bool = True
    max_tokens: int = 10
    confidence: float = 0.3
    _drafts: dict[int, tuple[nn.Module, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self) -> None:
        from ..quant.int4 import check_group_size

        check_group_size(self.group_size)
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"QuantizedSelf needs 1 <= num_tokens <= max_tokens, got {self.num_tokens}, {self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"QuantizedSelf confidence must be in [0, 1), got {self.confidence}")

    def draft_for(self, model: nn.Module) -> nn.Module:
        """The W4A8 copy of ``model`` (built once per model and kept by this transform)."""
        if id(model) not in self._drafts:
            from ..quant import W4A8

            quant = W4A8(group_size=self.group_size, quantize_lm_head=self.quantize_lm_head, progress=False,
                         keep_original=False)
            self._drafts[id(model)] = quantized_copy(model, quant)
        return self._drafts[id(model)][0]

    def check_model(self, model: nn.Module) -> None:
        self.draft_for(model)  # fails here, before anything is applied, if W4A8 cannot quantize it

    def drafter_report(self) -> dict[str, Any]:
        sizes = [b for _, b in self._drafts.values()]
        return {
            "draft": f"this model under W4A8 (group {self.group_size}, lm_head "
            f"{'quantized' if self.quantize_lm_head else 'float'}), embeddings and norms shared",
            "draft weights MiB (extra memory)": round(sizes[-1] / 2**20, 1) if sizes else None,
        }

    def make_drafter(self, model: nn.Module) -> Drafter:
        return DraftModelDrafter(
            self.draft_for(model), self.num_tokens, self.confidence, self.adaptive, self.max_tokens
        )
