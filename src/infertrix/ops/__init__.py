"""infertrix ops: ``torch.library`` custom ops with PyTorch references and compiled kernels.

Every op is declared in its own module here (schema, reference, fake implementation); the
compiled extension ``infertrix._C`` is loaded after them and registers faster CPU/CUDA kernels
for the same ops. ``status()`` reports which backend each op uses.

To add an op: write ``ops/<name>.py`` like ``quantize.py``, import it below (before the
extension loads), add ``csrc/cpu/<name>.cpp`` with a ``TORCH_LIBRARY_IMPL(infertrix, CPU, m)``
block, and a parity test against the reference in ``tests/ops/``.
"""

from . import _extension
from .engine import add_rms_norm, gelu_tanh_mul, gqa_attention, kv_append, rms_norm, rope, silu_mul  # noqa: F401  (engine/)
from .kivi_attention import kivi_decode_attention  # noqa: F401  (declares the fused KIVI decode attention)
from .kv_cache_ops import kv_dequantize, kv_dequantize_into, kv_gather, kv_quantize  # noqa: F401  (declares the KV-cache ops)
from .ngram_index import ngram_index_update, ngram_lookup  # noqa: F401  (speculative/)
from .quantize import quantize_per_token_int8, quantize_per_token_int8_reference
from .registry import OPS, OpInfo, OpsStatus, set_cpu_isa, status
from .skinny_linear import skinny_linear  # noqa: F401  (speculative/ verification, decoding)
from .w4a8 import w4a8_linear, w4a8_matmul_int32  # noqa: F401  (declares the W4A8 ops)
from .w8a8 import w8a8_linear  # noqa: F401  (declares the W8A8 op)
from .w8a8_flat import w8a8_flat_linear  # noqa: F401  (FlattenQuant: per-tensor static activations)

_extension.load()

__all__ = [
    "OPS",
    "OpInfo",
    "OpsStatus",
    "quantize_per_token_int8",
    "quantize_per_token_int8_reference",
    "set_cpu_isa",
    "status",
]
