#!/usr/bin/env bash
# Set up (if needed) and run the default federated experiment: all-MiniLM-L6-v2, Rotten Tomatoes, 10 clients,
# Dirichlet alpha = 0.5, FLoRA-NA. Extra arguments go to `fedlora run` (a config file and/or key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/fedlora run "$@"
