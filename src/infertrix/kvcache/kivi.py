"""KIVI: 2- or 4-bit KV cache, keys quantized per channel and values per token.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
https://arxiv.org/abs/2402.02750.

Decoding reads the quantized tokens from their codes: on an sdpa model, applying KIVI selects the
attention function :func:`kivi_attention` (registered with transformers' public
``AttentionInterface`` as ``"infertrix_kivi"``; undo restores the previous implementation), which
is sdpa except for one-token steps of a layer that holds codes, where it calls
``infertrix::kivi_decode_attention`` instead of dequantizing the whole cache first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core import Applied, ConfigError, Stage, Transform, register_transform
from ..core.attention import SDPA_ATTENTION, sdpa_forward
from ..core.model import text_config
from .attach import KIVI_ATTENTION, check_supported_model, kv_setup


def decode_mask(mask: Tensor | None, stored: int) -> tuple[bool, Tensor | None]:
    """(ok, the additive float [B, stored] mask) of one decoding step from a 4D attention mask;
    ok is False for masks the fused kernel does not model (per head, or not one per stored token)."""
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != stored:
        return False, None
    row = mask[:, 0, 0]
    if row.dtype == torch.bool:
        return True, torch.zeros(row.shape, device=row.device).masked_fill_(~row, float("-inf"))
    return True, row.float()


def kivi_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function ``"infertrix_kivi"``: sdpa (``infertrix_sdpa``, which does
    not copy grouped keys and values for masked query windows), except for a decoding step of a
    layer holding KIVI codes (the attention pre-hook passes it as ``kivi_layer``, and its update
    returned only the residual window): softmax attention straight from the codes. A case the
    kernel does not model (soft-capping, sinks, a per-head mask) dequantizes as before."""
    layer = kwargs.pop("kivi_layer", None)
    if layer is not None:
        ok, mask = decode_mask(attention_mask, layer.stored_length)
        unmodelled = (
            dropout
            or kwargs.get("softcap")
            or any(kwargs.get(name) is not None for name in ("position_bias", "s_aux", "sinks"))
        )
        if ok and not unmodelled:
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            return layer.codes.attend(query, layer.keys, layer.values, mask, scale), None
        key, value = layer.full_keys_values()
    return sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(KIVI_ATTENTION, kivi_attention)
AttentionMaskInterface.register(KIVI_ATTENTION, sdpa_mask)


@register_transform("kivi")
@dataclass
class KIVI(Transform):
    """Stores the KV of full-attention layers in ``bits`` bits (asymmetric min/max, packed uint8):
    keys per channel over groups of ``group_size`` tokens (keys have outlier channels), values per
    token over groups of ``group_size`` channels; the last ``residual_length`` to
    ``residual_length + group_size - 1`` tokens stay in full precision. Composes with an eviction
    policy (evict, then quantize what is kept). Memory ~ bits/16 of bf16 (bits/32 of fp32) plus two
    float32 per group. Lossy. Prefill attention dequantizes (``infertrix::kv_dequantize``); decoding
    on an sdpa model attends from the codes (``infertrix::kivi_decode_attention``, see the module
    docstring), one pass over bits/32 of the float32 cache per step.

    - ``bits``: 2 or 4.
    - ``group_size``: tokens per key group and channels per value group (capped at head_dim).
    - ``residual_length``: recent tokens always in full precision (the paper: 32-128).
    """
    use_when = "the KV cache is the memory limit: every token kept in 2 or 4 bits; composes with an eviction policy"

    stage: ClassVar[Stage] = Stage.CACHE
    conflict_group: ClassVar[str | None] = None
    primary: ClassVar[str | None] = "bits"

    bits: int = 4
    group_size: int = 32
    residual_length: int = 32

    def tensor_parallel_problem(self, model: nn.Module, tp: Any) -> str | None:
        return None  # each rank quantizes its own KV heads

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
        undo_quant = setup.set_quant(self)
        before = text_config(model)._attn_implementation
        if before in ("sdpa", SDPA_ATTENTION) and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(KIVI_ATTENTION)

        def undo() -> None:
            if text_config(model)._attn_implementation == KIVI_ATTENTION:
                model.set_attn_implementation(before)
            undo_quant()

        return Applied(self, undo=undo, report=setup.report)
