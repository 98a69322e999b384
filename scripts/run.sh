#!/usr/bin/env bash
# Set up (if needed) and run the default federated experiment (configs/default.toml): all-MiniLM-L6-v2, Rotten
# Tomatoes, 10 clients, Dirichlet alpha = 0.5, FLoRA-NA. Extra arguments go to `fedlora run`: key=value overrides
# apply to the default experiment; a first argument that is a config file replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ $# -eq 0 || "${1:-}" == *=* ]]; then set -- configs/default.toml "$@"; fi
exec .venv/bin/fedlora run "$@"
