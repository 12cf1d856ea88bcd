"""Every compiled CPU op has a C++ autograd kernel in front of it.

``torch.library.custom_op`` puts a Python autograd wrapper in front of each op (about 5 us a call
outside ``inference_mode``); the ops have no backward, so each C++ file registers torch's C++
"not implemented" kernel for AutogradCPU instead. A new op that forgets it still works, only
slower on every call of a decode step, so this test names it.
"""

import pytest
import torch

from infertrix import ops
from infertrix.ops.registry import OPS
from infertrix.ops.skinny_linear import skinny_linear, skinny_linear_reference

compiled = pytest.mark.skipif(ops.status().cpu_isa is None, reason="the compiled extension is not built")


@compiled
def test_every_compiled_cpu_op_has_a_cpp_autograd_kernel():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    cpu = [info.qualname for info in OPS.values() if has(info.qualname, "CPU")]
    assert len(cpu) >= 20  # every op family: quantized linears, engine, KV cache, n-grams, skinny
    missing = [q for q in cpu if not has(q, "AutogradCPU")]
    assert not missing, f"register torch::autograd::autogradNotImplementedFallback() for AutogradCPU: {missing}"


@compiled
def test_grad_enabled_forward_is_exact_and_backward_fails_loudly():
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(24, 40)
    y = skinny_linear(x, w)
    torch.testing.assert_close(y.detach(), skinny_linear_reference(x.detach(), w))
    assert type(y.grad_fn).__name__ == "NotImplemented"  # the C++ kernel, not the Python wrapper
    with pytest.raises(RuntimeError):
        y.sum().backward()  # inference-only ops: a backward must fail, never give a wrong gradient
