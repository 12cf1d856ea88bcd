#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: `infertrix bench` on SmolLM2, the baseline
# beside every recipe that exists so far.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
infertrix bench --model smollm2 --recipe baseline --all-recipes --json bench-out/bench.json --plot bench-out/bench.png "$@"
