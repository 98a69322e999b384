#!/usr/bin/env bash
# The causal-LM evidence of docs/results.md ("Causal language models"): SmolLM2-135M-Instruct, LoRA r=8 on q_proj,
# v_proj, float32, on fedlora:arithmetic (configs/evidence-v2/causal/). One `fedlora compare` per cell runs its
# methods on the same clients, sampling and seed. Groups, in order of priority:
#   1. calibration: the centralised reference (one client holding all the training data, 50 AdamW steps, the NLL
#      every 10 steps from step 0, exact match at the end), FedIT on the math cell, Dirichlet alpha 0.3, seed 0, and
#      local-only training (one sampled client alone for the same 50 steps: one round, one client, whose global
#      model is its own adapter);
#   2. the seven core methods on the math cell, alpha 0.3 and 1.0, seed 0;
#   3. the GSM8K transfer check (FedIT, FLoRA-NA, FlexLoRA trained on arithmetic, judged on 100 GSM8K test
#      problems), needs GSM8K=/path/to/gsm8k/test.jsonl;
#   4. the code demonstration: HumanEval pass@1 of the base model, and of FedIT trained on MBPP-format problems,
#      needs MBPP=/path/to/mbpp.jsonl;
#   5. the core methods on the math cell, alpha 0.3 and 1.0, seed 1.
# Finished runs are kept and an interrupted run resumes from its last round (`compare --resume`), so the script can
# be stopped and started again; a finished reference is kept. Long: a math run takes ~0.5-1 CPU-hour on a 2-core
# CPU; run it in the background:
#   bash scripts/evidence-causal.sh [OUT_DIR]      (default runs/evidence-causal)
# CELLS=1,2 runs only those groups; EXTRA="key=value ..." adds overrides to every run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evidence-causal}
core=${CORE_METHODS:-fedit,flora_na,flora,fedex_lora,flexlora,ffa_lora,fedsa_lora}
cells=${CELLS:-1,2,3,4,5}
read -r -a extra <<< "${EXTRA:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
conf=configs/evidence-v2/causal
mkdir -p "$out"

compare() {  # compare CONFIG METHODS CELL_NAME [key=value ...]
  local config=$1 methods=$2 cell=$3
  shift 3
  .venv/bin/fedlora compare "$conf/$config.toml" --methods "$methods" --out "$out/$cell" --resume "$@" "${extra[@]}"
}
once() {  # once LOG COMMAND...: run COMMAND unless LOG records a finished run (its last line is "done")
  local log=$1
  shift
  if [[ -f $log && $(tail -n 1 "$log") == done ]]; then return; fi
  "$@" > "$log.tmp" && echo done >> "$log.tmp" && mv "$log.tmp" "$log"
}
wanted() { [[ ",$cells," == *",$1,"* ]]; }

if wanted 1; then
  once "$out/centralised-alpha0.3-seed0.log" .venv/bin/python scripts/centralised_reference.py \
    "$conf/arithmetic.toml" seed=0 data.alpha=0.3 "${extra[@]}" --steps 50 --every 10 --schedules continuous
  compare arithmetic fedit arithmetic-alpha0.3-seed0 seed=0 data.alpha=0.3
  compare arithmetic fedit arithmetic-local-only-alpha0.3-seed0 seed=0 data.alpha=0.3 \
    federation.rounds=1 federation.clients_per_round=1 train.local_steps=50
fi
if wanted 2; then
  for alpha in 0.3 1.0; do compare arithmetic "$core" "arithmetic-alpha$alpha-seed0" seed=0 "data.alpha=$alpha"; done
fi
if wanted 3; then
  : "${GSM8K:?set GSM8K=/path/to/gsm8k/test.jsonl for the GSM8K transfer check}"
  compare gsm8k-transfer fedit,flora_na,flexlora gsm8k-transfer-alpha0.3-seed0 seed=0 "data.eval_dataset=$GSM8K"
fi
if wanted 4; then
  : "${MBPP:?set MBPP=/path/to/mbpp.jsonl (MBPP format: text, code, test_list) for the code demonstration}"
  once "$out/humaneval-base.log" .venv/bin/python scripts/centralised_reference.py "$conf/code.toml" \
    "data.dataset=$MBPP" "${extra[@]}" --steps 0 --schedules continuous
  compare code fedit code-mbpp-seed0 seed=0 "data.dataset=$MBPP"
fi
if wanted 5; then
  for alpha in 0.3 1.0; do compare arithmetic "$core" "arithmetic-alpha$alpha-seed1" seed=1 "data.alpha=$alpha"; done
fi
