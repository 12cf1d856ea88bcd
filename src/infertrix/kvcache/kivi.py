"""KIVI: 2- or 4-bit KV cache, keys quantized per channel and values per token.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
https://arxiv.org/abs/2402.02750.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core import Applied, ConfigError, Stage, Transform, register_transform
from ..core.model import text_config
from .attach import check_supported_model, kv_setup


@register_transform("kivi")
@dataclass
class KIVI(Transform):
    """Stores the KV of full-attention layers in ``bits`` bits (asymmetric min/max, packed uint8):
    keys per channel over groups of ``group_size`` tokens (keys have outlier channels), values per
    token over groups of ``group_size`` channels; the last ``residual_length`` to
    ``residual_length + group_size - 1`` tokens stay in full precision. Composes with an eviction
    policy (evict, then quantize what is kept). Memory ~ bits/16 of bf16 (bits/32 of fp32) plus two
    float32 per group; attention dequantizes (``infertrix::kv_dequantize``). Lossy.

    - ``bits``: 2 or 4.
    - ``group_size``: tokens per key group and channels per value group (capped at head_dim).
    - ``residual_length``: recent tokens always in full precision (the paper: 32-128).
    """

    stage: ClassVar[Stage] = Stage.CACHE
    conflict_group: ClassVar[str | None] = None
    primary: ClassVar[str | None] = "bits"

    bits: int = 4
    group_size: int = 32
    residual_length: int = 32

    def validate(self) -> None:
        if self.bits not in (2, 4):
            raise ConfigError(f"KIVI.bits must be 2 or 4, got {self.bits!r}")
        if self.group_size < 1 or self.group_size % (8 // self.bits):
            raise ConfigError(
                f"KIVI.group_size must be a positive multiple of {8 // self.bits}, got {self.group_size}"
            )
        if self.residual_length < 0:
            raise ConfigError(f"KIVI.residual_length must be >= 0, got {self.residual_length}")

    def check_model(self, model: nn.Module) -> None:
        check_supported_model(model, self, needs_queries=False)
        cfg = text_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim % min(self.group_size, head_dim):
            raise ConfigError(
                f"KIVI.group_size={self.group_size} must divide head_dim={head_dim} (value groups)"
            )

    def apply(self, model: nn.Module) -> Applied:
        setup = kv_setup(model, create=True)
        undo = setup.set_quant(self)
        return Applied(self, undo=undo, report=setup.report)
