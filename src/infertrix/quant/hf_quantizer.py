"""transformers' own loader for infertrix checkpoints: a registered quantization config and quantizer.

``model.save_pretrained(d)`` after ``optimize`` writes ``quantization_config`` into ``config.json``
(``quant_method: "infertrix"``: the quantized modules' constructor arguments, a skip plan), and
``AutoModelForCausalLM.from_pretrained(d)`` then rebuilds the same model through transformers'
extension points for quantization methods (``register_quantization_config`` /
``register_quantizer``, registered when ``infertrix`` is imported): the quantizer swaps the
recorded modules into the empty (meta) model before transformers loads the tensors, re-applies the
skip plan, checks the result, and records the transforms for ``infertrix.describe``.

Without infertrix imported, transformers only *warns* about an unknown ``quant_method`` and would
load the float architecture with random weights where the quantized tensors are. So the record
also puts a marker into ``config.json``'s ``fusion_config`` (transformers reads it after the
quantizer has seen the config, and raises ``Unknown fusion type: <name>`` for a name it does not
know); the marker's name says to install and import infertrix. The quantizer removes the marker
before transformers reads it, and puts it back on the loaded model's config so that saving the
loaded model again keeps the checkpoint self-describing. (``transformers_weights``, the other
setting read at that point, is deleted by ``PretrainedConfig.save_pretrained``.) The subprocess
test in ``tests/quant/test_hf_checkpoint.py`` checks that refusal against the installed
transformers.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.transform import ConfigError

QUANT_METHOD = "infertrix"
FORMAT = 2
REFUSAL_MARKER = (
    "infertrix (this checkpoint was saved by infertrix: pip install infertrix, then `import infertrix` "
    "before from_pretrained)"
)


class InfertrixConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an infertrix checkpoint (also the live record on an optimized model).

    quant: ``{"recipe": str, "modules": {qualified name: module spec}}`` of the weight transform.
    skip: ``{"recipe": str, "plan": SkipPlan.to_dict(), "schedule": SkipDecode's or None}``.
    """

    def __init__(
        self,
        format: int = FORMAT,
        quant: dict[str, Any] | None = None,
        skip: dict[str, Any] | None = None,
        infertrix_version: str | None = None,
        **kwargs: Any,
    ) -> None:
        from .. import __version__

        self.quant_method = QUANT_METHOD
        self.format = format
        self.quant = quant
        self.skip = skip
        self.infertrix_version = infertrix_version or __version__

    @property
    def empty(self) -> bool:
        return self.quant is None and self.skip is None

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}

    def __iter__(self):
        yield from self.to_dict().items()


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
        from .checkpoint import check_checkpoint_keys, rebuild

        rebuild(model, self.quantization_config)
        if checkpoint_files:
            check_checkpoint_keys(model, checkpoint_files)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        from .checkpoint import attach_loaded

        add_marker(model.config)
        attach_loaded(model, self.quantization_config, str(getattr(model.config, "_name_or_path", "")))

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def add_marker(config: Any) -> None:
    """Make transformers refuse this config without infertrix imported (see the module docstring)."""
    fusions = dict(getattr(config, "fusion_config", None) or {})
    fusions[REFUSAL_MARKER] = True
    config.fusion_config = fusions


def remove_marker(config: Any) -> None:
    fusions = getattr(config, "fusion_config", None)
    if not isinstance(fusions, dict) or REFUSAL_MARKER not in fusions:
        return
    rest = {k: v for k, v in fusions.items() if k != REFUSAL_MARKER}
    if rest:
        config.fusion_config = rest
    else:
        delattr(config, "fusion_config")


def register() -> None:
    """Register the config and quantizer with transformers (idempotent; done when this module is
    imported, which ``import infertrix`` arranges as soon as transformers' quantizer registry loads)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(InfertrixConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(InfertrixHfQuantizer)


register()
