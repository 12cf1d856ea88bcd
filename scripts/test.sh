#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check -q src tests benchmarks examples && echo "lint: ok"
python -m pytest -q -p no:cacheprovider "$@"
