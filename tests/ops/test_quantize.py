"""infertrix::quantize_per_token_int8: compiled kernels against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from infertrix import ops
from infertrix.ops import quantize_per_token_int8, quantize_per_token_int8_reference

SHAPES = [(1, 1), (1, 15), (3, 17), (5, 576), (2, 3, 1000), (7, 4096), (33, 1537)]



@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_bit_for_bit(isa, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape) * 7 + len(str(dtype)))
    rows = torch.rand(*shape[:-1], 1, generator=g) * 20
    x = (torch.randn(*shape, generator=g) * rows).to(dtype)
    q, s = quantize_per_token_int8(x)
    qr, sr = quantize_per_token_int8_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (*shape[:-1], 1)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


def test_reference_semantics():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -3.0, 1.5]])
    q, s = quantize_per_token_int8_reference(x)
    assert torch.allclose(s.squeeze(1), torch.tensor([2.0 / 127, 1e-10 / 127, 3.0 / 127]))
    assert q.tolist()[0] == [64, -127, 32, 0]  # 63.5 rounds half to even -> 64, 31.75 -> 32
    assert q.tolist()[1] == [0, 0, 0, 0]
    assert q.tolist()[2] == [127, 127, -127, 64]  # 63.5 -> 64 (half to even)
    # dequantized error is at most half a step per element
    assert torch.all((q.float() * s - x).abs() <= s / 2 + 1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_many_seeds(isa, seed):
    # half-way cases (x * 127 / amax landing near k + 0.5) are where a sloppy division shows
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(9, 4096, generator=g) * torch.rand(9, 1, generator=g) * 20).to(torch.bfloat16)
    for t in (x, x.float()):
        q, s = quantize_per_token_int8(t)
        qr, sr = quantize_per_token_int8_reference(t)
        assert torch.equal(q, qr) and torch.equal(s, sr)


def test_rows_are_independent():
    x = torch.randn(6, 300)
    q, s = quantize_per_token_int8(x)
    for i in range(6):
        qi, si = quantize_per_token_int8(x[i : i + 1])
        assert torch.equal(qi, q[i : i + 1]) and torch.equal(si, s[i : i + 1])


def test_non_contiguous_input():
    x = torch.randn(40, 64).t()  # stride (1, 64)
    q, s = quantize_per_token_int8(x)
    qr, sr = quantize_per_token_int8_reference(x.contiguous())
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_opcheck():
    torch.library.opcheck(quantize_per_token_int8, (torch.randn(3, 70),))
    torch.library.opcheck(quantize_per_token_int8, (torch.randn(2, 5, 33, dtype=torch.bfloat16),))


def test_rejects_integer_input():
    with pytest.raises((TypeError, RuntimeError), match="float32, bfloat16 or float16"):
        quantize_per_token_int8(torch.ones(2, 3, dtype=torch.int32))


def test_torch_compile():
    fn = torch.compile(lambda t: quantize_per_token_int8(t), backend="eager", fullgraph=True)
    x = torch.randn(4, 100)
    q, s = fn(x)
    qr, sr = quantize_per_token_int8_reference(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_status_reports_backend():
    st = ops.status()
    entry = st["quantize_per_token_int8"]
    if st.cpu_isa is None:
        assert entry["cpu"] == "reference"
    else:
        assert entry["cpu"].startswith("c++/")
    assert "quantize_per_token_int8" in str(st)


def test_without_extension_reference_runs_and_status_says_why():
    import subprocess
    import sys

    code = (
        "import torch, infertrix\n"
        "st = infertrix.ops.status()\n"
        "assert st['quantize_per_token_int8']['cpu'] == 'reference', st\n"
        "assert 'INFERTRIX_DISABLE_EXTENSION' in st.extension, st.extension\n"
        "x = torch.randn(3, 50)\n"
        "q, s = infertrix.ops.quantize_per_token_int8(x)\n"
        "qr, sr = infertrix.ops.quantize_per_token_int8_reference(x)\n"
        "assert torch.equal(q, qr) and torch.equal(s, sr)\n"
        "print(st)\n"
    )
    env = {**__import__("os").environ, "INFERTRIX_DISABLE_EXTENSION": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout
