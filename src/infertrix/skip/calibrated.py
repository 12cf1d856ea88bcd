"""Shared calibration fields of the strategies that rank units by similarity on real text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.transform import ConfigError
from .calibration import Similarities, calibration_ids, measure_similarities
from .strategy import SkipStrategy


def _tokenizer_for(model: nn.Module, who: str) -> Any:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if path:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            pass
    raise ConfigError(
        f"{who} calibrates on text but cannot find a tokenizer for this model; pass tokenizer=..., "
        "calibration_ids=... (1-D token ids) or similarities=... (from measure_similarities)"
    )


@dataclass
class CalibratedStrategy(SkipStrategy):
    """A strategy ranking units by input/output similarity measured on calibration text.

    calibration_tokens: tokens of the shipped prose (tail half of Pride and Prejudice) to measure on.
    window: tokens per forward pass during calibration.
    protect_last: never choose the last decoder layer (it writes the logits' features directly).
    progress: show a tqdm progress bar while calibrating.
    tokenizer: the model's tokenizer (found from the model's folder when None).
    calibration_ids: 1-D token ids to calibrate on instead of the shipped prose.
    similarities: precomputed :class:`Similarities` (skips calibration; lets several budgets share one run).
    """

    calibration_tokens: int = 1024
    window: int = 512
    protect_last: bool = True
    progress: bool = True
    tokenizer: Any = field(default=None, repr=False, compare=False)
    calibration_ids: torch.Tensor | None = field(default=None, repr=False, compare=False)
    similarities: Similarities | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        if self.calibration_tokens < 1 or self.window < 1:
            raise ConfigError(
                f"{type(self).__name__}: calibration_tokens and window must be >= 1, "
                f"got {self.calibration_tokens} and {self.window}"
            )

    def measure(self, model: nn.Module) -> Similarities:
        """Similarities of every layer and sublayer of ``model`` (cached on this config)."""
        if self.similarities is None:
            ids = self.calibration_ids
            if ids is None:
                tok = self.tokenizer if self.tokenizer is not None else _tokenizer_for(model, type(self).__name__)
                ids = calibration_ids(tok, self.calibration_tokens)
            self.similarities = measure_similarities(
                model, ids, window=self.window, progress=self.progress, desc=f"{self.name} calibration"
            )
        return self.similarities
