#!/usr/bin/env bash
# The fault figures of docs/reliability.md: FedIT on the packaged Rotten Tomatoes, 6 clients (IID), 3 rounds x 5
# local steps, each client's test split subsampled to 50 examples. Clients 3 (update x20), 4 (NaN) and 5 (raises)
# are faulty. In process: a clean run, the faulty run screened by norm, and the faulty run screened for finiteness
# only (the scaled update gets through); on flower-simulation and flower-deployment the faulty run screened by
# norm. Usage: bash scripts/fault_figures.sh OUT_DIR   (about 30 CPU-minutes on a 2-core machine)
set -euo pipefail
out=${1:?usage: fault_figures.sh OUT_DIR}
cd "$(dirname "$0")/.."
fedlora=${FEDLORA:-.venv/bin/fedlora}
python=${PYTHON:-.venv/bin/python}
base=(federation.method=fedit data.num_clients=6 data.partition=iid federation.rounds=3 train.local_steps=5
  train.lr=2e-3 eval.max_examples=50 federation.round_timeout=300)
faults='faults.clients={3 = "scale:20", 4 = "nan", 5 = "raise"}'
run() { # name, overrides...
  local name=$1
  shift
  [[ -f $out/$name/summary.json ]] || "$fedlora" run "${base[@]}" "$@" "output.dir=$out/$name" > "$out/$name.log" 2>&1
}
mkdir -p "$out"
run clean
run inprocess-norm "$faults" federation.screen=norm
run inprocess-finite "$faults" federation.screen=finite
run simulation-norm "$faults" federation.screen=norm federation.engine=flower-simulation
run deployment-norm "$faults" federation.screen=norm federation.engine=flower-deployment
"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | rounds | clients aggregated | excluded (reason) | failed | global accuracy | global loss |")
print("|---|---|---|---|---|---|---|")
for name in ("clean", "inprocess-norm", "inprocess-finite", "simulation-norm", "deployment-norm"):
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    excluded = "; ".join(f"{c}: {r}" for c, r in last.get("excluded_clients", {}).items()) or "none"
    failed = ", ".join(last.get("failed_clients", {})) or "none"
    acc, loss = last["global_accuracy"], last["global_loss"]
    print(f"| {name} | {len(records)} | {last['clients']} | {excluded} | {failed} | {acc:.4f} | {loss:.4f} |")
EOF
