#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on two pytest-xdist workers that steal queued tests from
# each other (the long Flower and resume tests end up spread over both), printing the 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 RAY_DISABLE_USAGE_STATS=1
.venv/bin/ruff check .
.venv/bin/ruff format --check src tests benchmarks scripts
exec .venv/bin/pytest -n 2 --dist worksteal --durations=15 "$@"
