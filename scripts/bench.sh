#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `infertrix bench` on SmolLM2, the baseline beside
# every recipe that exists so far plus a calibrated W4A8 row, each family on its workload (about
# 12 minutes on 2 quiet cores; `bash scripts/bench.sh --quick` is a smoke run of a few minutes).
# Tables: bench-out/bench.md (markdown, for BENCHMARKS.md), data: bench-out/bench.json, plot: bench-out/bench.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
infertrix bench --model smollm2 --recipe baseline --all-recipes \
  --recipe "w4a8(gptq=true)" \
  --threads 2 --json bench-out/bench.json --markdown bench-out/bench.md --plot bench-out/bench.png "$@"
