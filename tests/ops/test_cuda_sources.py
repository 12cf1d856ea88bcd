"""The CUDA sources compile with nvcc (the machines here have nvcc but no GPU; see test_w4a8_cuda.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_w4a8_kernels_compile_to_int8_tensor_core_ptx(tmp_path):
    src = tmp_path / "t.cu"
    src.write_text(
        f'#include "{ROOT / "csrc/cuda/w4a8_kernels.cuh"}"\n'
        "template __global__ void infertrix_cuda::quantize_rows<float>(const float*, int64_t, int64_t, int64_t, "
        "int64_t, int8_t*, float*, int32_t*);\n"
    )
    ptx = tmp_path / "t.ptx"
    run = subprocess.run([NVCC, "-std=c++17", "-ptx", "-arch=compute_80", str(src), "-o", str(ptx)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    text = ptx.read_text()
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in text  # int8 tensor cores
    for kernel in ("quantize_rows", "w4a8_mma", "w4a8_generic", "pad_rows"):
        assert kernel in text, kernel
