#!/usr/bin/env bash
# The evidence of docs/results.md, protocol version 2 (configs/evidence-v2/: MiniLM, LoRA r=8, 10 clients,
# 20 rounds x 10 local steps at lr 2e-3, float32). One `fedlora compare` per cell (dataset, Dirichlet alpha, seed,
# client count) runs its methods on the same clients and seed. Cells in order of priority:
#   1. the seven core methods on Rotten Tomatoes, alpha 0.5 / 0.1 / 1.0, seed 0, then BBC News alpha 0.5, seed 0;
#   2. the core methods on Rotten Tomatoes alpha 0.5, seeds 1 and 2 (3 seeds with seed 0);
#   3. every other registered method on Rotten Tomatoes alpha 0.5, seed 0;
#   4. 50 clients with 10 sampled per round (Rotten Tomatoes alpha 0.5, core methods);
#   5. BBC News alpha 0.1 and 1.0 (seed 0), and alpha 0.5 seeds 1 and 2;
#   6. the multi-task cell (configs/evidence-v2/multi-task.toml: Rotten Tomatoes and BBC News as two tasks, task
#      Dirichlet 0.5, seed 0): FedIT, FL-TAC, FedLEASE, CE-LoRA, FLoRA-NA, FedSA-LoRA.
# Finished runs are kept and an interrupted run resumes from its last round (`compare --resume`), so the script can
# be stopped and started again; a cell that gains methods runs only the new ones. Long: ~15-30 CPU-minutes a run on
# Rotten Tomatoes, ~1-1.5 CPU-hours on BBC News (max_length 128) on a 2-core CPU; run it in the background:
#   bash scripts/evidence.sh [OUT_DIR]      (default runs/evidence-v2; tables: scripts/collect_evidence.py OUT_DIR)
# CELLS=1,2 runs only those groups; EXTRA="key=value ..." adds overrides to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evidence-v2}
core=${CORE_METHODS:-fedit,flora_na,flora,fedex_lora,flexlora,ffa_lora,fedsa_lora}
rest=${REST_METHODS:-fedrot_lora,fedsvd,fed_sb,rolora,lora_fair,frlora,fedloru,pfedloru,mfedloru,fslora,flasc,hetlora}
multitask=${MULTITASK_METHODS:-fedit,fl_tac,fedlease,ce_lora,flora_na,fedsa_lora}
cells=${CELLS:-1,2,3,4,5,6}
read -r -a extra <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

compare() {  # compare DATASET ALPHA SEED METHODS CELL_NAME [key=value ...]
  local dataset=$1 alpha=$2 seed=$3 methods=$4 cell=$5
  shift 5
  .venv/bin/fedlora compare "configs/evidence-v2/$dataset.toml" --methods "$methods" --out "$out/$cell" --resume \
    "seed=$seed" "data.alpha=$alpha" "$@" "${extra[@]}"
}
wanted() { [[ ",$cells," == *",$1,"* ]]; }

if wanted 1; then
  for alpha in 0.5 0.1 1.0; do compare rotten-tomatoes "$alpha" 0 "$core" "rotten-tomatoes-alpha$alpha-seed0"; done
  compare bbc-news 0.5 0 "$core" bbc-news-alpha0.5-seed0
fi
if wanted 2; then
  for seed in 1 2; do compare rotten-tomatoes 0.5 "$seed" "$core" "rotten-tomatoes-alpha0.5-seed$seed"; done
fi
if wanted 3; then
  compare rotten-tomatoes 0.5 0 "$core,$rest" rotten-tomatoes-alpha0.5-seed0
fi
if wanted 4; then
  compare rotten-tomatoes 0.5 0 "$core" rotten-tomatoes-alpha0.5-50clients-seed0 \
    data.num_clients=50 federation.clients_per_round=10
fi
if wanted 5; then
  for alpha in 0.1 1.0; do compare bbc-news "$alpha" 0 "$core" "bbc-news-alpha$alpha-seed0"; done
  for seed in 1 2; do compare bbc-news 0.5 "$seed" "$core" "bbc-news-alpha0.5-seed$seed"; done
fi
if wanted 6; then
  compare multi-task 0.5 0 "$multitask" multi-task-seed0
fi
