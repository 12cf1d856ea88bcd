"""The ``quantization_config`` of an infertrix checkpoint, and the marker that makes transformers
refuse the folder when infertrix is not imported.

Without infertrix imported, transformers only *warns* about an unknown ``quant_method`` and would
load the float architecture with random weights where the quantized tensors are. So the record
also puts a marker into ``config.json``'s ``fusion_config`` (transformers reads it after the
quantizer has seen the config, and raises ``Unknown fusion type: <name>`` for a name it does not
know); the marker's name says to install and import infertrix. The quantizer
(:mod:`.hf_quantizer`) removes the marker before transformers reads it, and puts it back on the
loaded model's config so that saving the loaded model again keeps the checkpoint self-describing.
(``transformers_weights``, the other setting read at that point, is deleted by
``PretrainedConfig.save_pretrained``.) The subprocess test in ``tests/quant/test_hf_checkpoint.py``
checks that refusal against the installed transformers.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

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
