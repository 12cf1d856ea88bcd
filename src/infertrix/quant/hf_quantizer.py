"""transformers' own loader for infertrix checkpoints: the quantizer, registered for ``quant_method: "infertrix"``.

``model.save_pretrained(d)`` after ``optimize`` writes ``quantization_config`` into ``config.json``
(an :class:`~.hf_config.InfertrixConfig`: the quantized modules' specs, a skip plan), and
``AutoModelForCausalLM.from_pretrained(d)`` then rebuilds the same model through transformers'
extension points for quantization methods (``register_quantization_config`` /
``register_quantizer``, registered when ``infertrix`` is imported): the quantizer swaps the
recorded modules into the empty (meta) model before transformers loads the tensors, re-applies the
skip plan, checks the result, and records the transforms for ``infertrix.describe`` (the work is
:mod:`.checkpoint`'s). Without infertrix imported transformers refuses the folder: see the marker
in :mod:`.hf_config`.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..core.transform import ConfigError
from .checkpoint import attach_loaded, check_checkpoint_keys, rebuild
from .hf_config import FORMAT, QUANT_METHOD, InfertrixConfig, add_marker, remove_marker


class InfertrixHfQuantizer(HfQuantizer):
    """Loads infertrix checkpoints in ``from_pretrained`` (it never quantizes a float model: use ``optimize``)."""

    requires_calibration = True
    quantization_config: InfertrixConfig

    def __init__(self, quantization_config: InfertrixConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ConfigError(
                "from_pretrained(quantization_config=InfertrixConfig()) cannot quantize a float checkpoint; load it "
                "normally and call infertrix.optimize(model, ...), then model.save_pretrained(path)"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if cfg.format != FORMAT:
            raise ConfigError(
                f"infertrix checkpoint format {cfg.format} (saved by infertrix {cfg.infertrix_version}) is not the "
                f"format {FORMAT} this infertrix reads; load it with that infertrix version"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ConfigError("infertrix checkpoints load on one device; drop device_map (or give a single device)")

    def update_attn_implementation(self, config: Any) -> Any:
        # the one hook that sees the model config before transformers reads `fusion_config`
        remove_marker(config)
        return config

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        rebuild(model, self.quantization_config)
        if checkpoint_files:
            check_checkpoint_keys(model, checkpoint_files)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        add_marker(model.config)
        attach_loaded(model, self.quantization_config, str(getattr(model.config, "_name_or_path", "")))

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent; done when this module is
    imported, which ``import infertrix`` arranges as soon as transformers' quantizer registry loads)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(InfertrixConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(InfertrixHfQuantizer)


register()
