#!/usr/bin/env bash
# The version-1 evidence of docs/results.md (the short budget: 10 rounds x 10 steps at lr 5e-4), in this order:
#   1. one `fedlora compare` per (dataset, Dirichlet alpha, seed), every method on the same clients and seed:
#      all methods on Rotten Tomatoes alpha in {0.5, 0.1}, seed 0;
#   2. variants on Rotten Tomatoes alpha=0.5 seed 0 (one `fedlora run` each): FLASC with a per-tensor top-k,
#      FLASC and FSLoRA with a plain average of the deltas instead of the paper's server AdamW;
#   3. heterogeneous client ranks (model.lora.ranks) on Rotten Tomatoes alpha=0.5 seed 0, for the methods that
#      accept them, and mFedLoRU with zero-padded instead of per-component averaging;
#   4. FedIT, FLoRA-NA, FLoRA, FedEx-LoRA and FlexLoRA on the rest of the grid (BBC News, seeds 1 and 2);
#   5. FlexLoRA with split = "sqrt" and the default split on BBC News alpha=0.1 seed 0, in float32: does its lead
#      there come from the orthonormal A of the default split (docs/results.md)?
# Finished runs are kept and an interrupted run resumes from its last round, so the script can be stopped and
# started again. Long (~8 minutes a run on Rotten Tomatoes, ~12-17 on BBC News, on this machine): run it in the
# background. The configs pin model.precision = "bf16"; on a CPU without native bfloat16 that is emulated and ~15x
# slower (docs/benchmarks.md): there, run
#   EXTRA=model.precision=fp32 bash scripts/evidence-v1.sh runs/evidence-fp32
#   bash scripts/evidence-v1.sh [OUT_DIR]        (default runs/evidence; variants in OUT_DIR-variants)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evidence}
core=${CORE_METHODS:-fedit,flora_na,flora,fedex_lora,flexlora}
all=${ALL_METHODS:-$core,ffa_lora,fedsa_lora,rolora,lora_fair,frlora,fedloru,pfedloru,mfedloru,fslora,flasc,hetlora}
hetero=fedit,flora_na,flexlora,hetlora,mfedloru
ranks="model.lora.ranks=[2,2,4,4,4,8,8,8,8,8]"
sgd1="method.server_optimizer=sgd method.server_lr=1.0 method.server_weight_decay=0.0"
read -r -a extra <<< "${EXTRA:-}"  # overrides added to every run, e.g. EXTRA=model.precision=fp32
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

compare() {  # compare CONFIG SEED METHODS DIR [key=value ...]
  local config=$1 seed=$2 methods=$3 dir=$4
  shift 4
  .venv/bin/fedlora compare "configs/evidence/$config.toml" --methods "$methods" --out "$dir" --resume "seed=$seed" "$@" "${extra[@]}"
}

# variant CONFIG SEED NAME key=value ...: one run in OUT-variants/CELL/NAME (CELL=CONFIG-seedSEED unless set)
variant() {
  local config=$1 seed=$2 dir="$out-variants/${CELL:-$1-seed$2}/$3"
  shift 3
  if [[ -f $dir/summary.json ]]; then return; fi
  if [[ -f $dir/checkpoint.pt ]]; then
    .venv/bin/fedlora run --resume "$dir"
  else
    .venv/bin/fedlora run "configs/evidence/$config.toml" "seed=$seed" "output.dir=$dir" "$@" "${extra[@]}"
  fi
}

compare rotten-tomatoes-alpha0.5 0 "$all" "$out/rotten-tomatoes-alpha0.5-seed0"
compare rotten-tomatoes-alpha0.1 0 "$all" "$out/rotten-tomatoes-alpha0.1-seed0"
variant rotten-tomatoes-alpha0.5 0 flasc-per-tensor federation.method=flasc method.topk_scope=per_tensor
# shellcheck disable=SC2086
variant rotten-tomatoes-alpha0.5 0 flasc-per-tensor-sgd1 federation.method=flasc method.topk_scope=per_tensor $sgd1
# shellcheck disable=SC2086
variant rotten-tomatoes-alpha0.5 0 fslora-sgd1 federation.method=fslora $sgd1
compare rotten-tomatoes-alpha0.5 0 "$hetero" "$out/rotten-tomatoes-alpha0.5-ranks2-8-seed0" "$ranks"
CELL=rotten-tomatoes-alpha0.5-ranks2-8-seed0 variant rotten-tomatoes-alpha0.5 0 mfedloru-zero-pad \
  federation.method=mfedloru method.nesting=zero_pad "$ranks"
compare bbc-news-alpha0.5 0 "$core" "$out/bbc-news-alpha0.5-seed0"
compare bbc-news-alpha0.1 0 "$core" "$out/bbc-news-alpha0.1-seed0"
compare rotten-tomatoes-alpha0.5 1 "$core" "$out/rotten-tomatoes-alpha0.5-seed1"
compare rotten-tomatoes-alpha0.5 2 "$core" "$out/rotten-tomatoes-alpha0.5-seed2"
# item 5 ran in float32 (the VM of that day emulated bfloat16), so both splits run in float32
variant bbc-news-alpha0.1 0 flexlora-fp32 federation.method=flexlora model.precision=fp32
variant bbc-news-alpha0.1 0 flexlora-split-sqrt-fp32 federation.method=flexlora method.split=sqrt model.precision=fp32
