"""Linear layers without quantization: float kernels swapped under ``nn.Linear`` (``skinny_linear``),
and the layer choosing and reversible swapping that every module swap shares (:mod:`.swap`, used by
the quant family too).

    import infertrix as ix
    ix.optimize(model, "skinny_linear")          # = ix.linear.Skinny(): same weights, faster decoding
"""

from .skinny import Skinny, SkinnyLinear

__all__ = ["Skinny", "SkinnyLinear"]
