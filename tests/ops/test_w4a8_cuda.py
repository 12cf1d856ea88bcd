"""CUDA W4A8 kernels against the PyTorch reference. Runs only on a machine with a GPU and a CUDA
build of infertrix._C: on the CPU-only machines of this project it is skipped, so the CUDA kernels
have NOT been run (see csrc/cuda/w4a8.cu)."""

from __future__ import annotations

import pytest
import torch

from infertrix.ops.quantize import quantize_per_token_int8_reference
from infertrix.ops.w4a8 import w4a8_linear_reference, w4a8_matmul_int32_reference
from infertrix.quant import W4A8Linear

cuda_kernels = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "infertrix::w4a8_linear", "CUDA"
)
pytestmark = pytest.mark.skipif(not cuda_kernels, reason="no GPU / infertrix built without CUDA")


@pytest.mark.parametrize(("m", "n", "k", "gs", "symmetric"), [
    (1, 576, 576, 128, False), (5, 200, 320, 32, True), (33, 48, 1000, 64, False),  # tensor cores
    (3, 40, 96, 8, False), (2, 17 * 16, 88, 16, True),  # generic kernel (group not a multiple of 32)
    (7, 96, 72, -1, False),
])
def test_matches_reference(m, n, k, gs, symmetric):
    g = torch.Generator().manual_seed(m * 1000 + n)
    lin = torch.nn.Linear(k, n, bias=True)
    torch.nn.init.normal_(lin.weight, generator=g)
    mod = W4A8Linear.from_linear(lin, gs, symmetric)
    x = torch.randn(m, k, generator=g)
    ref = w4a8_linear_reference(x, mod.qweight, mod.scale, mod.group_scale, mod.zero, k, gs, mod.bias)
    dev = mod.cuda()
    out = torch.ops.infertrix.w4a8_linear(x.cuda(), dev.qweight, dev.scale, dev.group_scale, dev.zero, k, gs, dev.bias)
    assert torch.equal(out.cpu(), ref)
    xq, _ = quantize_per_token_int8_reference(x)
    acc_ref = w4a8_matmul_int32_reference(xq, mod.qweight.cpu(), mod.group_scale.cpu(),
                                          None if mod.zero is None else mod.zero.cpu(), k, n, gs)
    acc = torch.ops.infertrix.w4a8_matmul_int32(xq.cuda(), dev.qweight, dev.group_scale, dev.zero, k, n, gs)
    assert torch.equal(acc.cpu(), acc_ref)
