"""Real prose shipped with the package (public domain), for perplexity and retrieval tests.

It lives in :mod:`infertrix.core.calibration`, which calibrates on the same text."""

from __future__ import annotations

from ..core.calibration import TEXTS, body_text, load_text

__all__ = ["TEXTS", "body_text", "load_text"]
