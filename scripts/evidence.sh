#!/usr/bin/env bash
# The evidence grid of docs/results.md (conventions.md §5): one `fedlora compare` per (dataset, Dirichlet alpha,
# seed), every method on the same clients and seed. Every method on Rotten Tomatoes alpha in {0.5, 0.1}, seed 0;
# FedIT, FLoRA-NA, FLoRA, FedEx-LoRA and FlexLoRA on the rest of the grid. `--resume` keeps finished runs and
# resumes an interrupted one, so the script can be stopped and started again. Long: run it in the background.
#   bash scripts/evidence.sh [OUT_DIR]        (default runs/evidence)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evidence}
core=${CORE_METHODS:-fedit,flora_na,flora,fedex_lora,flexlora}
all=${ALL_METHODS:-$core,ffa_lora,fedsa_lora,rolora,lora_fair,frlora,fedloru,pfedloru,mfedloru,fslora,flasc,hetlora}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
grid=(
  "rotten-tomatoes-alpha0.5 0 $all"
  "rotten-tomatoes-alpha0.1 0 $all"
  "bbc-news-alpha0.5 0 $core"
  "bbc-news-alpha0.1 0 $core"
  "rotten-tomatoes-alpha0.5 1 $core"
  "rotten-tomatoes-alpha0.5 2 $core"
)
for cell in "${grid[@]}"; do
  read -r name seed methods <<<"$cell"
  dir="$out/$name-seed$seed"
  .venv/bin/fedlora compare "configs/evidence/$name.toml" --methods "$methods" --out "$dir" --resume "seed=$seed"
done
