"""Self-speculative decoding: the model drafts for itself under a cheaper plan, then verifies.

Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
Decoding" (ACL 2024, https://arxiv.org/abs/2309.08168); Xia et al., "SWIFT: On-the-Fly
Self-Speculative Decoding for LLM Inference Acceleration" (ICLR 2025,
https://arxiv.org/abs/2410.06916). No second model: drafting runs the target itself inside
``activate(model)``, a context manager that applies a plan on entry and removes it on exit (a
skip plan from the skip family, the model under another precision...). The draft keeps its own
KV cache (:class:`~.draft_model.DraftModelDrafter`), so the plan's cache never mixes with the
verifier's. Lossless whatever the plan: a poor plan only lowers acceptance. Measured on SmolLM2
(issue 6): dropping a quarter of its layers accepted 5.6% of draft tokens, so plans should be
searched against acceptance, not taken from a fixed layer count.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..core.registry import register_transform
from ..core.transform import ConfigError
from .draft_model import DraftModelDrafter
from .drafter import Drafter
from .transform import SpeculativeDecoding


@register_transform("self_speculative")
@dataclass
class SelfSpeculative(SpeculativeDecoding):
    """Self-speculation through a plan activated around each draft forward (Draft & Verify,
    https://arxiv.org/abs/2309.08168; SWIFT, https://arxiv.org/abs/2410.06916). Lossless; no
    extra weights; the draft cache costs as much as the plan keeps.

    Fields:
      activate: ``activate(model)`` returns a context manager under which the model is the draft
        (for example one that applies a skip plan and restores the layers on exit).
      num_tokens, adaptive, max_tokens, confidence: as in :class:`~.draft_model.DraftModel`.
    """

    primary = "num_tokens"
    bench_recipe: ClassVar[str | None] = None  # needs a model object, not a recipe string
    activate: Callable[[nn.Module], AbstractContextManager] | Any = field(default=None, repr=False)
    num_tokens: int = 4
    adaptive: bool = True
    max_tokens: int = 10
    confidence: float = 0.3

    def validate(self) -> None:
        if not callable(self.activate):
            raise ConfigError(
                "SelfSpeculative needs activate=callable(model) returning a context manager that puts "
                "the model in its draft configuration (e.g. applies a skip plan) and undoes it on exit"
            )
        if self.num_tokens < 1 or self.max_tokens < self.num_tokens:
            raise ConfigError(
                f"SelfSpeculative needs 1 <= num_tokens <= max_tokens, got {self.num_tokens}, {self.max_tokens}"
            )
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"SelfSpeculative confidence must be in [0, 1), got {self.confidence}")

    def drafter_report(self) -> dict[str, Any]:
        return {"draft plan": getattr(self.activate, "__name__", repr(self.activate))}

    def make_drafter(self, model: nn.Module) -> Drafter:
        return DraftModelDrafter(
            model, self.num_tokens, self.confidence, self.adaptive, self.max_tokens,
            context=lambda: self.activate(model),
        )
