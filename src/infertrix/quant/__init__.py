"""Weight (and activation) quantization: module swaps of ``nn.Linear`` (W4A8 and its relatives).

    import infertrix as ix
    ix.optimize(model, "w4a8")                    # no data: RTN g32, MSE clip, lm_head int4
    ix.optimize(model, ix.quant.W4A8(gptq=True))  # calibrated: GPTQ act_order + rotation

Every quantized module is a :class:`QuantizedLinear` of a registered kind (``"w4a8"``, ``"w8a8"``,
``"w4a16"``). ``Skinny`` and ``SkinnyLinear`` (float kernels, no quantization) live in
:mod:`infertrix.linear`; the names here are aliases of those, for code written before the move.
"""

from ..linear.skinny import Skinny, SkinnyLinear  # aliases: see the docstring
from . import hf_quantizer  # noqa: F401 - registers the checkpoint loader with transformers
from .checkpoint import load_quantized
from .flattenquant import FlattenLinear, FlattenQuant
from .int4 import Int4Weights, quantize_int4
from .linear_base import QuantizedLinear
from .transform import QuantTransform
from .w4a8 import W4A8
from .w4a8_linear import W4A8Linear
from .w4a16 import W4A16, W4A16Linear
from .w8a8 import W8A8, W8A8Linear

__all__ = [
    "FlattenLinear",
    "FlattenQuant",
    "W4A8",
    "W4A16",
    "W8A8",
    "Int4Weights",
    "QuantTransform",
    "QuantizedLinear",
    "Skinny",
    "SkinnyLinear",
    "W4A8Linear",
    "W4A16Linear",
    "W8A8Linear",
    "load_quantized",
    "quantize_int4",
]
