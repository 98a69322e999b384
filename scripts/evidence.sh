#!/usr/bin/env bash
# The evidence grid of docs/results.md (conventions.md §5): FedIT, FLoRA-NA, FLoRA, FedEx-LoRA and FlexLoRA on the
# same clients and seed, one `fedlora compare` per (dataset, Dirichlet alpha, seed). Long: run it in the background.
#   bash scripts/evidence.sh [OUT_DIR]        (default runs/evidence)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evidence}
methods=${METHODS:-fedit,flora_na,flora,fedex_lora,flexlora}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
grid=(
  "rotten-tomatoes-alpha0.5 0"
  "rotten-tomatoes-alpha0.1 0"
  "bbc-news-alpha0.5 0"
  "bbc-news-alpha0.1 0"
  "rotten-tomatoes-alpha0.5 1"
  "rotten-tomatoes-alpha0.5 2"
)
for cell in "${grid[@]}"; do
  read -r name seed <<<"$cell"
  dir="$out/$name-seed$seed"
  .venv/bin/fedlora compare "configs/evidence/$name.toml" --methods "$methods" --out "$dir" --resume "seed=$seed"
done
