"""Weight (and activation) quantization: module swaps of ``nn.Linear`` (W4A8 and its relatives).

    import infertrix as ix
    ix.optimize(model, "w4a8")                    # no data: RTN g32, MSE clip, lm_head int4
    ix.optimize(model, ix.quant.W4A8(gptq=True))  # calibrated: GPTQ act_order + rotation
"""

from .checkpoint import load_quantized
from .int4 import Int4Weights, quantize_int4
from .skinny import Skinny, SkinnyLinear
from .transform import QuantTransform
from .w4a8 import W4A8
from .w4a8_linear import W4A8Linear
from .w4a16 import W4A16, W4A16Linear
from .w8a8 import W8A8, W8A8Linear

__all__ = [
    "W4A8",
    "W4A16",
    "W8A8",
    "Int4Weights",
    "QuantTransform",
    "Skinny",
    "SkinnyLinear",
    "W4A8Linear",
    "W4A16Linear",
    "W8A8Linear",
    "load_quantized",
    "quantize_int4",
]
