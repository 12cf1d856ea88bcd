"""Shared calibration fields of the strategies that rank units by similarity on real text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.calibration import windows_for
from ..core.transform import ConfigError
from .calibration import Similarities, measure_similarities
from .state import measured_once
from .strategy import SkipStrategy


@dataclass
class CalibratedStrategy(SkipStrategy):
    """A strategy ranking units by input/output similarity measured on calibration text.

    tokenizer, calibration_text, calibration_ids, calibration_windows, window_tokens: the
      calibration fields of every family (see ``infertrix.core.calibration``); default 2 windows x
      512 tokens from the middle of the shipped Pride and Prejudice.
    protect_last: never choose the last decoder layer (it writes the logits' features directly).
    progress: show a tqdm progress bar while calibrating.
    similarities: precomputed :class:`Similarities` (skips calibration; lets several budgets share one run).
    """

    calibration_windows: int = 2
    window_tokens: int = 512
    protect_last: bool = True
    progress: bool = True
    tokenizer: Any = field(default=None, repr=False, compare=False)
    calibration_text: Any = field(default=None, repr=False, compare=False)
    calibration_ids: Any = field(default=None, repr=False, compare=False)
    similarities: Similarities | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        if self.calibration_windows < 1 or self.window_tokens < 1:
            raise ConfigError(
                f"{type(self).__name__}: calibration_windows and window_tokens must be >= 1, "
                f"got {self.calibration_windows} and {self.window_tokens}"
            )

    def measure(self, model: nn.Module) -> Similarities:
        """Similarities of every layer and sublayer of ``model``: ``similarities`` when given, else
        measured once per model and kept in the model's run-time record (never on this config)."""
        if self.similarities is not None:
            return self.similarities
        inputs = (self.calibration_ids, self.calibration_text, self.tokenizer, self.calibration_windows,
                  self.window_tokens)
        return measured_once(model, inputs, lambda: self._measure(model))

    def _measure(self, model: nn.Module) -> Similarities:
        # the middle of the shipped text: the perplexity benchmarks read its beginning
        windows = windows_for(model, self, 0.5, " or similarities=... (from measure_similarities)")
        return measure_similarities(model, windows, progress=self.progress, desc=f"{self.name} calibration")
